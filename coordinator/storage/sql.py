"""SqlStore: the :class:`Store` over SQLAlchemy 2 (Core tables, ORM sessions), for SQLite and
PostgreSQL.

Each method runs in one short transaction (``Session.begin()``); when it raises, every write
it made is rolled back. Rows a method reads and then changes are locked for the transaction:
``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` (one writer at a time) on
SQLite. The rules that matter most are also constraints of the schema, so that no bug above
and no concurrent caller can break them: one committed attempt per round number (a partial
unique index), one open round per task (another), unique model versions per task, valid
state names, and foreign keys.

Schema version 2. A database written by a newer fedcoord (higher ``schema_version``) is
refused when the store opens, never modified; an older one is migrated when it opens, in one
transaction (version 1 -> 2: the tasks table's state check gains ``budget_exhausted``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateTable

from coordinator.storage.base import (
    Store,
    check_round_transition,
    check_version_of,
    metrics_dict,
)
from coordinator.storage.errors import Conflict, NotFound, StorageError
from coordinator.storage.event_log_sql import SqlEventLog
from coordinator.storage.event_log_sql import metadata as event_log_metadata
from coordinator.storage.leases import Fence, SqlLeases, check_fence
from coordinator.storage.leases import metadata as leases_metadata
from coordinator.storage.records import (
    ModelVersionRecord,
    NewParticipants,
    ParticipantRecord,
    ParticipantUpdate,
    ParticipantWrite,
    RoundRecord,
    TaskRecord,
)
from coordinator.storage.security_sql import SqlSecurityStore
from coordinator.storage.security_sql import metadata as security_metadata
from core.types import ParticipantState, RoundState, TaskState

#: Version of the schema below; bump it (and add a migration) on any change to it.
#: 2: the tasks' state check admits ``budget_exhausted`` (differential privacy).
SCHEMA_VERSION = 2

#: The PostgreSQL advisory lock that openers preparing the schema take in turn.
_SCHEMA_LOCK_KEY = 0x66656463  # "fedc"

_OPEN_ROUND_STATES = [s.value for s in RoundState if not s.is_final]


def _one_of(column: str, enum: type[TaskState | RoundState | ParticipantState]) -> str:
    return f"{column} IN ({', '.join(repr(m.value) for m in enum)})"


metadata = sa.MetaData()

schema_version_table = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

tasks_table = sa.Table(
    "tasks",
    metadata,
    sa.Column("task_id", sa.String(255), primary_key=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("rounds_committed", sa.Integer, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.CheckConstraint(_one_of("state", TaskState), name="ck_tasks_state"),
)

model_versions_table = sa.Table(
    "model_versions",
    metadata,
    sa.Column("task_id", sa.String(255), sa.ForeignKey("tasks.task_id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("round_number", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("optimizer_state_path", sa.Text, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("task_id", "version", name="pk_model_versions"),
)

rounds_table = sa.Table(
    "rounds",
    metadata,
    sa.Column("round_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(255), sa.ForeignKey("tasks.task_id"), nullable=False),
    sa.Column("round_number", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("goal", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("deadline", sa.Double, nullable=False),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("selected", sa.Integer, nullable=False),
    sa.Column("reports", sa.Integer, nullable=False),
    sa.Column("failure_reason", sa.Text, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.UniqueConstraint("task_id", "round_number", "attempt", name="uq_rounds_attempt"),
    sa.ForeignKeyConstraint(
        ["task_id", "model_version"],
        ["model_versions.task_id", "model_versions.version"],
        name="fk_rounds_model_version",
    ),
    sa.CheckConstraint(_one_of("state", RoundState), name="ck_rounds_state"),
)
# A round number is committed at most once per task, whatever the code above does.
sa.Index(
    "ux_rounds_one_commit_per_number",
    rounds_table.c.task_id,
    rounds_table.c.round_number,
    unique=True,
    sqlite_where=rounds_table.c.state == RoundState.COMMITTED.value,
    postgresql_where=rounds_table.c.state == RoundState.COMMITTED.value,
)
# At most one round of a task is open (not final) at a time.
sa.Index(
    "ux_rounds_one_open_per_task",
    rounds_table.c.task_id,
    unique=True,
    sqlite_where=rounds_table.c.state.in_(_OPEN_ROUND_STATES),
    postgresql_where=rounds_table.c.state.in_(_OPEN_ROUND_STATES),
)

participants_table = sa.Table(
    "participants",
    metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.round_id"), nullable=False),
    sa.Column("device_id", sa.String(255), nullable=False),
    sa.Column("token_hash", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("num_examples", sa.BigInteger, nullable=False),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("round_id", "device_id", name="pk_participants"),
    sa.CheckConstraint(_one_of("state", ParticipantState), name="ck_participants_state"),
)


class SqlStore(Store):
    """The :class:`Store` in a SQL database named by a SQLAlchemy URL, such as
    ``sqlite:///runs/coordinator.db`` or ``postgresql://user:pw@host/db`` (a PostgreSQL URL
    without a driver uses psycopg 3, installed by fedcoord's ``postgres`` extra).

    Opening creates the tables if absent (and, for SQLite, the file's directory). SQLite runs
    with the WAL journal, ``synchronous=FULL`` (a commit survives power loss) and foreign keys
    on. Raises StorageError, naming the URL with its password hidden and the reason, if the
    URL is malformed, its driver is missing, the database is unreachable, or its schema is
    newer than this code's.

    Thread-safe: every call runs in its own session and transaction.
    """

    def __init__(self, url: str) -> None:
        self._url = _redact(url)
        try:
            parsed = make_url(url)
            if parsed.drivername == "postgresql":
                # The driver of fedcoord's "postgres" extra, not SQLAlchemy's default psycopg2.
                parsed = parsed.set(drivername="postgresql+psycopg")
            backend = parsed.get_backend_name()
            if backend == "sqlite":
                _create_parent_dir(parsed)
            engine = sa.create_engine(parsed)
        except (SQLAlchemyError, ImportError, OSError) as exc:
            raise StorageError(f"cannot open database {self._url}: {_reason(exc)}") from exc
        if backend == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_on_connect)
            sa.event.listen(engine, "begin", _sqlite_on_begin)
        self._engine: Engine = engine
        self._sessions = sessionmaker(engine)
        self._fence: Fence | None = None
        try:
            self._prepare_schema()
        except SQLAlchemyError as exc:
            engine.dispose()
            raise StorageError(f"cannot open database {self._url}: {_reason(exc)}") from exc
        except BaseException:
            engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"SqlStore({self._url!r})"

    def security_store(self) -> SqlSecurityStore:
        """The security records (devices, tokens, audit) in the same database."""
        return SqlSecurityStore(self._engine, self._url)

    def event_log(self) -> SqlEventLog:
        """The event log in the same database."""
        return SqlEventLog(self._engine, self._url)

    def leases(self, *, clock: Callable[[], float] = time.time,
               wait_s: float = 1.0) -> SqlLeases:
        """The leader leases (coordinator replicas) in the same database, on connections of
        their own (a renewal never waits for a connection the round store's callers hold);
        no lease call waits much more than ``wait_s`` for a lock or the database (on
        PostgreSQL: connecting, ``lock_timeout`` and ``statement_timeout``, each statement
        committed by itself; on SQLite: the busy timeout) and then raises StorageError.
        ``clock`` judges their expiry on SQLite (PostgreSQL uses its server's clock). Close
        them when done."""
        url = self._engine.url
        wait_ms = max(1, round(wait_s * 1000))
        try:
            if self._engine.dialect.name == "sqlite":
                engine = sa.create_engine(url)
                sa.event.listen(engine, "connect", _sqlite_on_connect)
                sa.event.listen(engine, "connect", _busy_timeout(wait_ms))
                sa.event.listen(engine, "begin", _sqlite_on_begin)
            else:
                engine = sa.create_engine(
                    url, pool_size=1, max_overflow=1, pool_pre_ping=True,
                    isolation_level="AUTOCOMMIT",
                    connect_args={"connect_timeout": max(1, round(wait_s))})
                sa.event.listen(engine, "connect", _postgres_waits(wait_ms))
        except (SQLAlchemyError, ImportError) as exc:
            raise StorageError(f"cannot open database {self._url}: {_reason(exc)}") from exc
        return SqlLeases(engine, self._url, clock=clock, owns_engine=True)

    def fence(self, fence: Fence | None) -> None:
        """From now on every write that changes tasks, rounds or model versions first checks
        that lease ``fence.name`` still has ``fence.epoch``, and raises
        :class:`~coordinator.storage.errors.Fenced` (nothing written) once it has not; None
        turns the check off. Participant writes are not checked: they only ever touch rounds
        that a fenced write opened."""
        self._fence = fence

    def _prepare_schema(self) -> None:
        with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Openers at once (replicas starting together) take turns: two CREATE TABLEs
                # of one name would fail the second opener. (SQLite: BEGIN IMMEDIATE.)
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                             {"key": _SCHEMA_LOCK_KEY})
            found: int | None = None
            if sa.inspect(conn).has_table(schema_version_table.name):
                newest = sa.select(sa.func.max(schema_version_table.c.version))
                found = conn.execute(newest).scalar()
            if found is not None and found > SCHEMA_VERSION:
                raise StorageError(
                    f"database {self._url} has schema version {found}, but this fedcoord knows "
                    f"only up to version {SCHEMA_VERSION}: it was written by a newer fedcoord; "
                    "upgrade fedcoord or use another database"
                )
            if found is not None and found < SCHEMA_VERSION and conn.dialect.name != "sqlite":
                _migrate_state_check(conn)
                conn.execute(schema_version_table.insert().values(version=SCHEMA_VERSION))
            metadata.create_all(conn)
            # The tables beside the round store's, under the same turn (their own classes
            # find them there when they open).
            for other in (event_log_metadata, security_metadata, leases_metadata):
                other.create_all(conn)
            if found is None:
                conn.execute(schema_version_table.insert().values(version=SCHEMA_VERSION))
        if found is not None and found < SCHEMA_VERSION and self._engine.dialect.name == "sqlite":
            self._migrate_sqlite()

    def _migrate_sqlite(self) -> None:
        """Version 1 -> 2 on SQLite, which cannot alter a CHECK constraint: the tasks table
        is rebuilt (SQLite's documented procedure: foreign keys off around one transaction
        that creates the new table, copies the rows, drops the old one, renames the new one,
        and checks every foreign key before committing)."""
        new_table = tasks_table.to_metadata(sa.MetaData(), name="tasks_new")
        create = str(CreateTable(new_table).compile(dialect=self._engine.dialect))
        columns = ", ".join(c.name for c in tasks_table.columns)
        raw = self._engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("PRAGMA foreign_keys=OFF")
            try:
                cursor.execute("BEGIN IMMEDIATE")
                version = cursor.execute("SELECT max(version) FROM schema_version").fetchone()
                if version[0] < SCHEMA_VERSION:  # not migrated by a concurrent opener
                    cursor.execute(create)
                    cursor.execute(f"INSERT INTO tasks_new ({columns}) "
                                   f"SELECT {columns} FROM tasks")
                    cursor.execute("DROP TABLE tasks")
                    cursor.execute("ALTER TABLE tasks_new RENAME TO tasks")
                    broken = cursor.execute("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise StorageError(f"database {self._url}: migration to schema "
                                           f"version {SCHEMA_VERSION} broke foreign keys: "
                                           f"{broken[:3]}")
                    cursor.execute("INSERT INTO schema_version (version) VALUES (?)",
                                   (SCHEMA_VERSION,))
                cursor.execute("COMMIT")
            except BaseException as exc:
                if raw.driver_connection is not None and raw.driver_connection.in_transaction:
                    cursor.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"cannot migrate database {self._url} to schema "
                                       f"version {SCHEMA_VERSION}: {exc}") from exc
                raise
            finally:
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
        finally:
            raw.close()

    # -- tasks -------------------------------------------------------------------------

    def create_task(
        self, task_id: str, spec_json: str, initial_version: ModelVersionRecord, now: float
    ) -> TaskRecord:
        check_version_of(initial_version, task_id)
        with self._tx() as s:
            self._check_fence(s)
            if _exists(s, tasks_table, tasks_table.c.task_id == task_id):
                raise Conflict(f"task {task_id!r} already exists")
            s.execute(
                tasks_table.insert().values(
                    task_id=task_id, spec_json=spec_json, state=TaskState.RUNNING.value,
                    created_at=now, rounds_committed=0, model_version=initial_version.version,
                    reason="",
                )
            )
            s.execute(model_versions_table.insert().values(**_version_row(initial_version)))
            return _task(s, task_id)

    def get_task(self, task_id: str) -> TaskRecord:
        with self._tx() as s:
            return _task(s, task_id)

    def list_tasks(self) -> list[TaskRecord]:
        with self._tx() as s:
            rows = s.execute(
                sa.select(tasks_table).order_by(tasks_table.c.created_at, tasks_table.c.task_id)
            )
            return [_task_record(r._mapping) for r in rows]

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        with self._tx() as s:
            self._check_fence(s)
            _task(s, task_id, lock=True)
            s.execute(
                tasks_table.update()
                .where(tasks_table.c.task_id == task_id)
                .values(state=state.value, reason=reason)
            )
            return _task(s, task_id)

    # -- rounds ------------------------------------------------------------------------

    def open_round(
        self, task_id: str, round_number: int, goal: int, started_at: float, deadline: float
    ) -> RoundRecord:
        with self._tx() as s:
            self._check_fence(s)
            # Locking the task row serializes the round openings of a task.
            task = _task(s, task_id, lock=True)
            if task.state is not TaskState.RUNNING:
                raise Conflict(f"task {task_id!r} is {task.state.value}; no round can open")
            current = _open_round_of(s, task_id)
            if current is not None:
                raise Conflict(
                    f"task {task_id!r} already has round {current.round_number} open "
                    f"({current.state.value})"
                )
            same_number = sa.and_(
                rounds_table.c.task_id == task_id, rounds_table.c.round_number == round_number
            )
            if _exists(
                s, rounds_table, same_number, rounds_table.c.state == RoundState.COMMITTED.value
            ):
                raise Conflict(f"round {round_number} of task {task_id!r} is already committed")
            attempts = s.execute(
                sa.select(sa.func.count()).select_from(rounds_table).where(same_number)
            ).scalar_one()
            round_id = s.execute(
                rounds_table.insert()
                .values(
                    task_id=task_id, round_number=round_number, attempt=attempts + 1,
                    state=RoundState.SELECTING.value, goal=goal, started_at=started_at,
                    deadline=deadline, ended_at=None, selected=0, reports=0, failure_reason="",
                    model_version=None, metrics_json="{}",
                )
                .returning(rounds_table.c.round_id)
            ).scalar_one()
            return _round(s, round_id)

    def get_round(self, round_id: int) -> RoundRecord:
        with self._tx() as s:
            return _round(s, round_id)

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        with self._tx() as s:
            _task(s, task_id)
            rows = s.execute(
                sa.select(rounds_table)
                .where(rounds_table.c.task_id == task_id)
                .order_by(rounds_table.c.round_number, rounds_table.c.attempt)
            )
            return [_round_record(r._mapping) for r in rows]

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        with self._tx() as s:
            _task(s, task_id)
            return _open_round_of(s, task_id)

    def set_round_state(
        self,
        round_id: int,
        state: RoundState,
        *,
        now: float,
        failure_reason: str = "",
        deadline: float | None = None,
    ) -> RoundRecord:
        with self._tx() as s:
            self._check_fence(s)
            rnd = _round(s, round_id, lock=True)
            check_round_transition(rnd.state, state)
            values: dict[str, Any] = {"state": state.value}
            if failure_reason:
                values["failure_reason"] = failure_reason
            if deadline is not None:
                values["deadline"] = deadline
            if state.is_final:
                values["ended_at"] = now
            s.execute(
                rounds_table.update().where(rounds_table.c.round_id == round_id).values(**values)
            )
            return _round(s, round_id)

    # -- participants ------------------------------------------------------------------

    def add_participants(
        self, round_id: int, participants: Sequence[tuple[str, str]], now: float
    ) -> None:
        with self._tx() as s:
            _add_participants(s, round_id, participants, now)

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        with self._tx() as s:
            return _participant(s, round_id, device_id)

    def set_participant_state(
        self,
        round_id: int,
        device_id: str,
        state: ParticipantState,
        *,
        now: float,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
    ) -> ParticipantRecord:
        with self._tx() as s:
            _set_participant_state(s, ParticipantUpdate(round_id, device_id, state, now,
                                                        num_examples, metrics))
            return _participant(s, round_id, device_id)

    def write_participants(self, writes: Sequence[ParticipantWrite]) -> None:
        """All ``writes`` in one transaction (one commit, one fsync), or none of them."""
        if not writes:
            return
        with self._tx() as s:
            # Consecutive writes of one kind go together: a few statements per run and
            # round, whatever the number of devices, with the rules checked as one by one.
            for adds, run in itertools.groupby(writes, key=lambda w: isinstance(w, NewParticipants)):
                if adds:
                    _add_participant_runs(s, [w for w in run if isinstance(w, NewParticipants)])
                else:
                    _update_participant_runs(
                        s, [w for w in run if isinstance(w, ParticipantUpdate)])

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        with self._tx() as s:
            _round(s, round_id)
            rows = s.execute(
                sa.select(participants_table)
                .where(participants_table.c.round_id == round_id)
                .order_by(participants_table.c.device_id)
            )
            return [_participant_record(r._mapping) for r in rows]

    # -- commits and model versions ----------------------------------------------------

    def commit_round(
        self, round_id: int, version: ModelVersionRecord, metrics: Mapping[str, float], now: float
    ) -> RoundRecord:
        values = metrics_dict(metrics)
        with self._tx() as s:
            self._check_fence(s)
            rnd = _round(s, round_id, lock=True)
            check_version_of(version, rnd.task_id, rnd.round_number)
            if rnd.state is not RoundState.AGGREGATING:
                raise Conflict(
                    f"round {round_id} is {rnd.state.value}; only an aggregating round commits"
                )
            _task(s, rnd.task_id, lock=True)
            if _exists(
                s,
                rounds_table,
                rounds_table.c.task_id == rnd.task_id,
                rounds_table.c.round_number == rnd.round_number,
                rounds_table.c.state == RoundState.COMMITTED.value,
            ):
                raise Conflict(
                    f"round {rnd.round_number} of task {rnd.task_id!r} is already committed"
                )
            if _exists(
                s,
                model_versions_table,
                model_versions_table.c.task_id == rnd.task_id,
                model_versions_table.c.version == version.version,
            ):
                raise Conflict(f"task {rnd.task_id!r} already has model version {version.version}")
            s.execute(model_versions_table.insert().values(**_version_row(version)))
            s.execute(
                rounds_table.update()
                .where(rounds_table.c.round_id == round_id)
                .values(
                    state=RoundState.COMMITTED.value, ended_at=now,
                    model_version=version.version, metrics_json=_dump(values),
                )
            )
            s.execute(
                tasks_table.update()
                .where(tasks_table.c.task_id == rnd.task_id)
                .values(
                    model_version=version.version,
                    rounds_committed=tasks_table.c.rounds_committed + 1,
                )
            )
            return _round(s, round_id)

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        with self._tx() as s:
            rnd = _round(s, round_id, lock=True)
            merged = {**rnd.metrics, **metrics_dict(metrics)}
            s.execute(
                rounds_table.update()
                .where(rounds_table.c.round_id == round_id)
                .values(metrics_json=_dump(merged))
            )
            return _round(s, round_id)

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        with self._tx() as s:
            row = s.execute(
                sa.select(model_versions_table).where(
                    model_versions_table.c.task_id == task_id,
                    model_versions_table.c.version == version,
                )
            ).first()
            if row is None:
                _task(s, task_id)
                raise NotFound(f"task {task_id!r} has no model version {version}")
            return _version_record(row._mapping)

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        with self._tx() as s:
            _task(s, task_id)
            row = s.execute(
                sa.select(model_versions_table)
                .where(model_versions_table.c.task_id == task_id)
                .order_by(model_versions_table.c.version.desc())
                .limit(1)
            ).first()
            if row is None:  # only if create_task was bypassed
                raise NotFound(f"task {task_id!r} has no model version")
            return _version_record(row._mapping)

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        with self._tx() as s:
            _task(s, task_id)
            rows = s.execute(
                sa.select(model_versions_table)
                .where(model_versions_table.c.task_id == task_id)
                .order_by(model_versions_table.c.version)
            )
            return [_version_record(r._mapping) for r in rows]

    # -- lifecycle ---------------------------------------------------------------------

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        with self._tx() as s:
            self._check_fence(s)
            ids = list(
                s.execute(
                    sa.select(rounds_table.c.round_id)
                    .where(rounds_table.c.state.in_(_OPEN_ROUND_STATES))
                    .order_by(rounds_table.c.round_id)
                    .with_for_update()
                ).scalars()
            )
            values: dict[str, Any] = {"state": RoundState.FAILED.value, "ended_at": now}
            if reason:
                values["failure_reason"] = reason
            if ids:
                s.execute(
                    rounds_table.update().where(rounds_table.c.round_id.in_(ids)).values(**values)
                )
            return [_round(s, round_id) for round_id in ids]

    def close(self) -> None:
        self._engine.dispose()

    # -- helpers -----------------------------------------------------------------------

    def _check_fence(self, s: Session) -> None:
        if self._fence is not None:
            check_fence(s.connection(), self._fence)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Session]:
        """One transaction; database errors leave it rolled back and become storage errors
        (a violated constraint: Conflict)."""
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError as exc:
            raise Conflict(f"the database refused the write: {_reason(exc.orig)}") from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"database {self._url} failed: {_reason(exc)}") from exc


def _add_participants(
    s: Session, round_id: int, participants: Sequence[tuple[str, str]], now: float
) -> None:
    devices = [device_id for device_id, _ in participants]
    rnd = _round(s, round_id, lock=True)
    if rnd.state.is_final:
        raise Conflict(f"round {round_id} is {rnd.state.value}; no one can join it")
    if not participants:
        return
    repeated = _first_repeated(devices)
    if repeated is None:
        repeated = s.execute(
            sa.select(participants_table.c.device_id)
            .where(
                participants_table.c.round_id == round_id,
                participants_table.c.device_id.in_(devices),
            )
            .limit(1)
        ).scalar()
    if repeated is not None:
        raise Conflict(f"device {repeated!r} is already a participant of round {round_id}")
    s.execute(
        participants_table.insert(),
        [
            {
                "round_id": round_id, "device_id": device_id, "token_hash": token_hash,
                "state": ParticipantState.SELECTED.value, "num_examples": 0,
                "metrics_json": "{}", "updated_at": now,
            }
            for device_id, token_hash in participants
        ],
    )
    s.execute(
        rounds_table.update()
        .where(rounds_table.c.round_id == round_id)
        .values(selected=rounds_table.c.selected + len(participants))
    )


def _set_participant_state(s: Session, u: ParticipantUpdate) -> None:
    old = _participant(s, u.round_id, u.device_id, lock=True)
    was_reported = old.state is ParticipantState.REPORTED
    is_reported = u.state is ParticipantState.REPORTED
    if was_reported and is_reported:
        raise Conflict(f"device {u.device_id!r} already reported in round {u.round_id}")
    values: dict[str, Any] = {"state": u.state.value, "updated_at": u.now}
    if u.num_examples:
        values["num_examples"] = u.num_examples
    if u.metrics is not None:
        values["metrics_json"] = _dump(metrics_dict(u.metrics))
    s.execute(
        participants_table.update()
        .where(
            participants_table.c.round_id == u.round_id,
            participants_table.c.device_id == u.device_id,
        )
        .values(**values)
    )
    if was_reported != is_reported:
        s.execute(
            rounds_table.update()
            .where(rounds_table.c.round_id == u.round_id)
            .values(reports=rounds_table.c.reports + (1 if is_reported else -1))
        )


def _add_participant_runs(s: Session, writes: Sequence[NewParticipants]) -> None:
    by_round: dict[int, list[NewParticipants]] = {}
    for w in writes:
        by_round.setdefault(w.round_id, []).append(w)
    for round_id, adds in by_round.items():
        rows = [(device_id, token_hash, w.now) for w in adds
                for device_id, token_hash in w.participants]
        rnd = _round(s, round_id, lock=True)
        if rnd.state.is_final:
            raise Conflict(f"round {round_id} is {rnd.state.value}; no one can join it")
        if not rows:
            continue
        devices = [device_id for device_id, _, _ in rows]
        repeated = _first_repeated(devices)
        if repeated is None:
            repeated = s.execute(
                sa.select(participants_table.c.device_id)
                .where(participants_table.c.round_id == round_id,
                       participants_table.c.device_id.in_(devices))
                .limit(1)
            ).scalar()
        if repeated is not None:
            raise Conflict(f"device {repeated!r} is already a participant of round {round_id}")
        s.execute(participants_table.insert(), [
            {"round_id": round_id, "device_id": device_id, "token_hash": token_hash,
             "state": ParticipantState.SELECTED.value, "num_examples": 0,
             "metrics_json": "{}", "updated_at": now}
            for device_id, token_hash, now in rows])
        s.execute(rounds_table.update().where(rounds_table.c.round_id == round_id)
                  .values(selected=rounds_table.c.selected + len(rows)))


def _update_participant_runs(s: Session, writes: Sequence[ParticipantUpdate]) -> None:
    devices_of: dict[int, set[str]] = {}
    for w in writes:
        devices_of.setdefault(w.round_id, set()).add(w.device_id)
    current: dict[tuple[int, str], dict[str, Any]] = {}
    for round_id, devices in devices_of.items():
        query = sa.select(participants_table).where(
            participants_table.c.round_id == round_id,
            participants_table.c.device_id.in_(sorted(devices)))
        for found in s.execute(query.with_for_update()):
            current[(round_id, found.device_id)] = dict(found._mapping)
    reports: dict[int, int] = {}
    for w in writes:
        row = current.get((w.round_id, w.device_id))
        if row is None:
            raise NotFound(f"device {w.device_id!r} is not a participant of round {w.round_id}")
        was_reported = row["state"] == ParticipantState.REPORTED.value
        is_reported = w.state is ParticipantState.REPORTED
        if was_reported and is_reported:
            raise Conflict(f"device {w.device_id!r} already reported in round {w.round_id}")
        row["state"] = w.state.value
        row["updated_at"] = w.now
        if w.num_examples:
            row["num_examples"] = w.num_examples
        if w.metrics is not None:
            row["metrics_json"] = _dump(metrics_dict(w.metrics))
        if was_reported != is_reported:
            reports[w.round_id] = reports.get(w.round_id, 0) + (1 if is_reported else -1)
    changed = {(w.round_id, w.device_id) for w in writes}
    s.execute(
        participants_table.update()
        .where(participants_table.c.round_id == sa.bindparam("b_round_id"),
               participants_table.c.device_id == sa.bindparam("b_device_id"))
        .values(state=sa.bindparam("b_state"), updated_at=sa.bindparam("b_updated_at"),
                num_examples=sa.bindparam("b_num_examples"),
                metrics_json=sa.bindparam("b_metrics_json")),
        [{f"b_{k}": current[key][k] for k in ("round_id", "device_id", "state", "updated_at",
                                                "num_examples", "metrics_json")}
         for key in sorted(changed)],
    )
    for round_id, delta in reports.items():
        if delta:
            s.execute(rounds_table.update().where(rounds_table.c.round_id == round_id)
                      .values(reports=rounds_table.c.reports + delta))


def _first_repeated(items: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _exists(s: Session, table: sa.Table, *where: sa.ColumnElement[bool]) -> bool:
    query = sa.select(sa.literal(1)).select_from(table).where(*where).limit(1)
    return s.execute(query).first() is not None


def _task(s: Session, task_id: str, *, lock: bool = False) -> TaskRecord:
    query = sa.select(tasks_table).where(tasks_table.c.task_id == task_id)
    row = s.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"no task {task_id!r}")
    return _task_record(row._mapping)


def _round(s: Session, round_id: int, *, lock: bool = False) -> RoundRecord:
    query = sa.select(rounds_table).where(rounds_table.c.round_id == round_id)
    row = s.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"no round {round_id}")
    return _round_record(row._mapping)


def _open_round_of(s: Session, task_id: str) -> RoundRecord | None:
    row = s.execute(
        sa.select(rounds_table).where(
            rounds_table.c.task_id == task_id, rounds_table.c.state.in_(_OPEN_ROUND_STATES)
        )
    ).first()
    return None if row is None else _round_record(row._mapping)


def _participant(
    s: Session, round_id: int, device_id: str, *, lock: bool = False
) -> ParticipantRecord:
    query = sa.select(participants_table).where(
        participants_table.c.round_id == round_id, participants_table.c.device_id == device_id
    )
    row = s.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"device {device_id!r} is not a participant of round {round_id}")
    return _participant_record(row._mapping)


def _dump(metrics: Mapping[str, float]) -> str:
    return json.dumps(dict(metrics), sort_keys=True)


def _load(text: str) -> dict[str, float]:
    return metrics_dict(json.loads(text))


def _task_record(m: sa.RowMapping) -> TaskRecord:
    return TaskRecord(
        task_id=m["task_id"], spec_json=m["spec_json"], state=TaskState(m["state"]),
        created_at=m["created_at"], rounds_committed=m["rounds_committed"],
        model_version=m["model_version"], reason=m["reason"],
    )


def _round_record(m: sa.RowMapping) -> RoundRecord:
    return RoundRecord(
        round_id=m["round_id"], task_id=m["task_id"], round_number=m["round_number"],
        attempt=m["attempt"], state=RoundState(m["state"]), goal=m["goal"],
        started_at=m["started_at"], deadline=m["deadline"], ended_at=m["ended_at"],
        selected=m["selected"], reports=m["reports"], failure_reason=m["failure_reason"],
        model_version=m["model_version"], metrics=_load(m["metrics_json"]),
    )


def _participant_record(m: sa.RowMapping) -> ParticipantRecord:
    return ParticipantRecord(
        round_id=m["round_id"], device_id=m["device_id"], token_hash=m["token_hash"],
        state=ParticipantState(m["state"]), num_examples=m["num_examples"],
        metrics=_load(m["metrics_json"]), updated_at=m["updated_at"],
    )


def _version_row(v: ModelVersionRecord) -> dict[str, Any]:
    return {
        "task_id": v.task_id, "version": v.version, "round_number": v.round_number,
        "path": v.path, "sha256": v.sha256, "size_bytes": v.size_bytes,
        "optimizer_state_path": v.optimizer_state_path, "created_at": v.created_at,
    }


def _version_record(m: sa.RowMapping) -> ModelVersionRecord:
    return ModelVersionRecord(
        task_id=m["task_id"], version=m["version"], round_number=m["round_number"],
        path=m["path"], sha256=m["sha256"], size_bytes=m["size_bytes"],
        optimizer_state_path=m["optimizer_state_path"], created_at=m["created_at"],
    )


# -- connection set-up -----------------------------------------------------------------


def _migrate_state_check(conn: sa.Connection) -> None:
    """Version 1 -> 2 where constraints can be altered (PostgreSQL)."""
    conn.execute(sa.text("ALTER TABLE tasks DROP CONSTRAINT IF EXISTS ck_tasks_state"))
    conn.execute(sa.text(f"ALTER TABLE tasks ADD CONSTRAINT ck_tasks_state "
                         f"CHECK ({_one_of('state', TaskState)})"))


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling starts transactions late (at the first write) so a
    # method's reads would not be part of its transaction; _sqlite_on_begin starts them instead.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
    finally:
        cursor.close()


def _busy_timeout(wait_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA busy_timeout={int(wait_ms)}")

    return on_connect


def _postgres_waits(wait_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {int(wait_ms)}")
            cursor.execute(f"SET statement_timeout = {int(wait_ms)}")
        dbapi_conn.commit()

    return on_connect


def _sqlite_on_begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front: what a transaction reads cannot change before
    # it writes, and two writers wait for each other instead of failing at their first write.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _create_parent_dir(url: URL) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _redact(url: str) -> str:
    """The URL with its password, if any, replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
