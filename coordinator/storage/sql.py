"""SqlStore: the Store over SQLAlchemy Core, for SQLite (default) and PostgreSQL.

Each method is one short transaction (``engine.begin()``); a failure rolls back every write
of that method. A committed round number is unique per task also in the database itself
(a partial unique index), so no bug above can commit a round twice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError

from coordinator.storage.base import Store, check_transition
from coordinator.storage.errors import Conflict, NotFound, StorageError
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState

SCHEMA_VERSION = 1

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))

tasks = sa.Table(
    "tasks", metadata,
    sa.Column("task_id", sa.String(64), primary_key=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("rounds_committed", sa.Integer, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)

rounds = sa.Table(
    "rounds", metadata,
    sa.Column("round_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.task_id"), nullable=False),
    sa.Column("round_number", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("goal", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("deadline", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float, nullable=True),
    sa.Column("selected", sa.Integer, nullable=False),
    sa.Column("reports", sa.Integer, nullable=False),
    sa.Column("failure_reason", sa.Text, nullable=False),
    sa.Column("model_version", sa.Integer, nullable=True),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.UniqueConstraint("task_id", "round_number", "attempt"),
)
sa.Index("ix_rounds_one_commit_per_number", rounds.c.task_id, rounds.c.round_number,
         unique=True, sqlite_where=rounds.c.state == "committed",
         postgresql_where=rounds.c.state == "committed")

model_versions = sa.Table(
    "model_versions", metadata,
    sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.task_id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("round_number", sa.Integer, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("optimizer_state_path", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

participants = sa.Table(
    "participants", metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.round_id"), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("num_examples", sa.BigInteger, nullable=False),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


class SqlStore(Store):
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "",
                                                                                 ":memory:"):
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._engine: Engine = sa.create_engine(url, future=True)
            if parsed.get_backend_name() == "sqlite":
                sa.event.listen(self._engine, "connect", _sqlite_pragmas)
            metadata.create_all(self._engine)
            self._check_schema()
        except (ArgumentError, NoSuchModuleError, SQLAlchemyError, OSError) as exc:
            raise StorageError(
                f"cannot open database {_redact(url)}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

    def _check_schema(self) -> None:
        with self._engine.begin() as c:
            found = c.execute(sa.select(schema_version.c.version)).scalar()
            if found is None:
                c.execute(schema_version.insert().values(version=SCHEMA_VERSION))
            elif found > SCHEMA_VERSION:
                raise StorageError(
                    f"database {_redact(self.url)} has schema version {found}; this coordinator "
                    f"knows version {SCHEMA_VERSION}: upgrade fedcoord")

    # -- tasks -----------------------------------------------------------------

    def create_task(self, task_id: str, spec_json: str, initial_version: ModelVersionRecord,
                    now: float) -> TaskRecord:
        with self._tx() as c:
            c.execute(tasks.insert().values(
                task_id=task_id, spec_json=spec_json, state=TaskState.RUNNING.value,
                created_at=now, rounds_committed=0, model_version=initial_version.version,
                reason=""))
            c.execute(model_versions.insert().values(**_version_row(initial_version)))
            return self._task(c, task_id)

    def get_task(self, task_id: str) -> TaskRecord:
        with self._tx() as c:
            return self._task(c, task_id)

    def list_tasks(self) -> list[TaskRecord]:
        with self._tx() as c:
            rows = c.execute(sa.select(tasks).order_by(tasks.c.created_at, tasks.c.task_id))
            return [_task_record(r._mapping) for r in rows]

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        with self._tx() as c:
            self._task(c, task_id)
            c.execute(tasks.update().where(tasks.c.task_id == task_id).values(
                state=state.value, reason=reason))
            return self._task(c, task_id)

    # -- rounds ----------------------------------------------------------------

    def open_round(self, task_id: str, round_number: int, goal: int, started_at: float,
                   deadline: float) -> RoundRecord:
        with self._tx() as c:
            self._task(c, task_id)
            existing = [_round_record(r._mapping) for r in c.execute(
                sa.select(rounds).where(rounds.c.task_id == task_id))]
            if any(not r.state.is_final for r in existing):
                raise Conflict(f"task {task_id} already has an open round")
            same = [r for r in existing if r.round_number == round_number]
            if any(r.state is RoundState.COMMITTED for r in same):
                raise Conflict(f"round {round_number} of task {task_id} is already committed")
            result = c.execute(rounds.insert().values(
                task_id=task_id, round_number=round_number, attempt=len(same) + 1,
                state=RoundState.SELECTING.value, goal=goal, started_at=started_at,
                deadline=deadline, ended_at=None, selected=0, reports=0, failure_reason="",
                model_version=None, metrics_json="{}"))
            assert result.inserted_primary_key is not None
            return self._round(c, int(result.inserted_primary_key[0]))

    def get_round(self, round_id: int) -> RoundRecord:
        with self._tx() as c:
            return self._round(c, round_id)

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        with self._tx() as c:
            self._task(c, task_id)
            rows = c.execute(sa.select(rounds).where(rounds.c.task_id == task_id)
                             .order_by(rounds.c.round_number, rounds.c.attempt))
            return [_round_record(r._mapping) for r in rows]

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        with self._tx() as c:
            row = c.execute(sa.select(rounds).where(
                rounds.c.task_id == task_id,
                rounds.c.state.in_([s.value for s in RoundState if not s.is_final]))).first()
            return None if row is None else _round_record(row._mapping)

    def set_round_state(self, round_id: int, state: RoundState, *, now: float,
                        failure_reason: str = "", deadline: float | None = None) -> RoundRecord:
        with self._tx() as c:
            rec = self._round(c, round_id)
            check_transition(rec.state, state)
            values: dict[str, Any] = {"state": state.value}
            if failure_reason:
                values["failure_reason"] = failure_reason
            if deadline is not None:
                values["deadline"] = deadline
            if state.is_final:
                values["ended_at"] = now
            c.execute(rounds.update().where(rounds.c.round_id == round_id).values(**values))
            return self._round(c, round_id)

    def add_participants(self, round_id: int, participants_: Sequence[tuple[str, str]],
                         now: float) -> None:
        if not participants_:
            return
        with self._tx() as c:
            self._round(c, round_id)
            c.execute(participants.insert(), [
                {"round_id": round_id, "device_id": d, "token_hash": h,
                 "state": ParticipantState.SELECTED.value, "num_examples": 0,
                 "metrics_json": "{}", "updated_at": now} for d, h in participants_])
            c.execute(rounds.update().where(rounds.c.round_id == round_id).values(
                selected=rounds.c.selected + len(participants_)))

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        with self._tx() as c:
            return self._participant(c, round_id, device_id)

    def set_participant_state(self, round_id: int, device_id: str, state: ParticipantState, *,
                              now: float, num_examples: int = 0,
                              metrics: Mapping[str, float] | None = None) -> ParticipantRecord:
        with self._tx() as c:
            p = self._participant(c, round_id, device_id)
            if p.state is ParticipantState.REPORTED and state is ParticipantState.REPORTED:
                raise Conflict(f"device {device_id!r} already reported in round {round_id}")
            values: dict[str, Any] = {"state": state.value, "updated_at": now}
            if num_examples:
                values["num_examples"] = num_examples
            if metrics is not None:
                values["metrics_json"] = json.dumps(dict(metrics))
            c.execute(participants.update().where(
                participants.c.round_id == round_id,
                participants.c.device_id == device_id).values(**values))
            if state is ParticipantState.REPORTED:
                c.execute(rounds.update().where(rounds.c.round_id == round_id).values(
                    reports=rounds.c.reports + 1))
            return self._participant(c, round_id, device_id)

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        with self._tx() as c:
            rows = c.execute(sa.select(participants).where(participants.c.round_id == round_id)
                             .order_by(participants.c.device_id))
            return [_participant_record(r._mapping) for r in rows]

    def commit_round(self, round_id: int, version: ModelVersionRecord,
                     metrics: Mapping[str, float], now: float) -> RoundRecord:
        with self._tx() as c:
            rec = self._round(c, round_id)
            if rec.state is not RoundState.AGGREGATING:
                raise Conflict(f"round {round_id} is {rec.state.value}, not aggregating")
            c.execute(model_versions.insert().values(**_version_row(version)))
            c.execute(rounds.update().where(rounds.c.round_id == round_id).values(
                state=RoundState.COMMITTED.value, ended_at=now, model_version=version.version,
                metrics_json=json.dumps(dict(metrics))))
            c.execute(tasks.update().where(tasks.c.task_id == rec.task_id).values(
                model_version=version.version, rounds_committed=tasks.c.rounds_committed + 1))
            return self._round(c, round_id)

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        with self._tx() as c:
            rec = self._round(c, round_id)
            merged = {**rec.metrics, **metrics}
            c.execute(rounds.update().where(rounds.c.round_id == round_id).values(
                metrics_json=json.dumps(merged)))
            return self._round(c, round_id)

    # -- model versions --------------------------------------------------------

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        with self._tx() as c:
            row = c.execute(sa.select(model_versions).where(
                model_versions.c.task_id == task_id,
                model_versions.c.version == version)).first()
            if row is None:
                raise NotFound(f"task {task_id!r} has no model version {version}")
            return _version_record(row._mapping)

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        with self._tx() as c:
            row = c.execute(sa.select(model_versions).where(model_versions.c.task_id == task_id)
                            .order_by(model_versions.c.version.desc()).limit(1)).first()
            if row is None:
                raise NotFound(f"task {task_id!r} has no model version")
            return _version_record(row._mapping)

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        with self._tx() as c:
            rows = c.execute(sa.select(model_versions).where(model_versions.c.task_id == task_id)
                             .order_by(model_versions.c.version))
            return [_version_record(r._mapping) for r in rows]

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        with self._tx() as c:
            open_states = [s.value for s in RoundState if not s.is_final]
            ids = [r.round_id for r in c.execute(
                sa.select(rounds.c.round_id).where(rounds.c.state.in_(open_states)))]
            if ids:
                c.execute(rounds.update().where(rounds.c.round_id.in_(ids)).values(
                    state=RoundState.FAILED.value, failure_reason=reason, ended_at=now))
            return [self._round(c, i) for i in ids]

    def close(self) -> None:
        self._engine.dispose()

    # -- helpers ---------------------------------------------------------------

    def _tx(self) -> _Transaction:
        return _Transaction(self._engine)

    @staticmethod
    def _task(c: Connection, task_id: str) -> TaskRecord:
        row = c.execute(sa.select(tasks).where(tasks.c.task_id == task_id)).first()
        if row is None:
            raise NotFound(f"no task {task_id!r}")
        return _task_record(row._mapping)

    @staticmethod
    def _round(c: Connection, round_id: int) -> RoundRecord:
        row = c.execute(sa.select(rounds).where(rounds.c.round_id == round_id)).first()
        if row is None:
            raise NotFound(f"no round {round_id}")
        return _round_record(row._mapping)

    @staticmethod
    def _participant(c: Connection, round_id: int, device_id: str) -> ParticipantRecord:
        row = c.execute(sa.select(participants).where(
            participants.c.round_id == round_id, participants.c.device_id == device_id)).first()
        if row is None:
            raise NotFound(f"device {device_id!r} is not a participant of round {round_id}")
        return _participant_record(row._mapping)


class _Transaction:
    """``with store._tx() as conn``: one transaction; IntegrityError becomes Conflict and
    other database errors StorageError, after the rollback."""

    def __init__(self, engine: Engine) -> None:
        self._cm = engine.begin()

    def __enter__(self) -> Connection:
        try:
            return self._cm.__enter__()
        except SQLAlchemyError as exc:
            raise StorageError(f"database unavailable: {exc}") from None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            self._cm.__exit__(exc_type, exc, tb)
        except SQLAlchemyError as commit_error:  # raised by the commit itself
            exc = commit_error
        if isinstance(exc, IntegrityError):
            raise Conflict(f"write refused by the database: {exc.orig}") from None
        if isinstance(exc, SQLAlchemyError):
            raise StorageError(f"database error: {exc}") from None
        return False


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _task_record(m: Mapping[str, Any]) -> TaskRecord:
    return TaskRecord(m["task_id"], m["spec_json"], TaskState(m["state"]), m["created_at"],
                      m["rounds_committed"], m["model_version"], m["reason"])


def _round_record(m: Mapping[str, Any]) -> RoundRecord:
    return RoundRecord(
        round_id=m["round_id"], task_id=m["task_id"], round_number=m["round_number"],
        attempt=m["attempt"], state=RoundState(m["state"]), goal=m["goal"],
        started_at=m["started_at"], deadline=m["deadline"], ended_at=m["ended_at"],
        selected=m["selected"], reports=m["reports"], failure_reason=m["failure_reason"],
        model_version=m["model_version"], metrics=json.loads(m["metrics_json"]))


def _participant_record(m: Mapping[str, Any]) -> ParticipantRecord:
    return ParticipantRecord(m["round_id"], m["device_id"], m["token_hash"],
                             ParticipantState(m["state"]), m["num_examples"],
                             json.loads(m["metrics_json"]), m["updated_at"])


def _version_row(v: ModelVersionRecord) -> dict[str, Any]:
    return {"task_id": v.task_id, "version": v.version, "round_number": v.round_number,
            "path": v.path, "sha256": v.sha256, "size_bytes": v.size_bytes,
            "optimizer_state_path": v.optimizer_state_path, "created_at": v.created_at}


def _version_record(m: Mapping[str, Any]) -> ModelVersionRecord:
    return ModelVersionRecord(m["task_id"], m["version"], m["round_number"], m["path"],
                              m["sha256"], m["size_bytes"], m["optimizer_state_path"],
                              m["created_at"])
