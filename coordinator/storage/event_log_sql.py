"""SqlEventLog: the :class:`EventLog` in the round store's database (same engine, its own
table, created when it first opens, as the security tables are).

The table is keyed (and so indexed) by ``(task_id, seq)``: reading a task's events after a
seq and finding its last seq are range scans of that key. Adding the table changes nothing
the round store's schema version covers: a database with it opens in an older fedcoord,
which ignores it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from coordinator.storage.errors import Conflict, StorageError
from coordinator.storage.event_log import DEFAULT_EVENT_LIMIT, EventLog, check_limit
from coordinator.storage.records import EventRecord

metadata = sa.MetaData()

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("task_id", sa.String(255), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("round_number", sa.Integer, nullable=False),
    sa.Column("device_id", sa.String(255), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("values_json", sa.Text, nullable=False),
    sa.Column("schema", sa.Integer, nullable=False),
    sa.PrimaryKeyConstraint("task_id", "seq", name="pk_events"),
)

_COLUMNS = tuple(c.name for c in events_table.columns)


class SqlEventLog(EventLog):
    """Thread-safe: every call runs in its own connection and transaction."""

    def __init__(self, engine: Engine, url_for_errors: str) -> None:
        self._engine = engine
        self._url = url_for_errors
        #: The insert in the driver's own parameter style (qmark for sqlite3, pyformat for
        #: psycopg), compiled once.
        self._insert_sql = str(events_table.insert().compile(dialect=engine.dialect))
        self._named_params = engine.dialect.paramstyle in ("named", "pyformat")
        try:
            metadata.create_all(engine)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot create the events table in {self._url}: "
                               f"{type(exc).__name__}") from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except IntegrityError as exc:
            raise Conflict(f"the database refused the events: {type(exc.orig).__name__} "
                           "(an event's task and seq are already stored)") from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"database {self._url} failed: {type(exc).__name__}") from exc

    def append_events(self, events: Sequence[EventRecord]) -> None:
        if not events:
            return
        rows: list[Any] = [(e.task_id, e.seq, e.kind, e.at, e.round_number, e.device_id, e.reason,
                 e.detail, json.dumps(dict(e.values), sort_keys=True), e.schema)
                for e in events]
        if self._named_params:
            rows = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
        with self._tx() as conn:
            # The driver's own executemany: a third of the CPU time of a Core insert per
            # event (the events of every check-in pass through here).
            conn.exec_driver_sql(self._insert_sql, rows)

    def list_events(self, task_id: str, after_seq: int = 0,
                    limit: int = DEFAULT_EVENT_LIMIT) -> list[EventRecord]:
        check_limit(limit)
        t = events_table
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(t).where(t.c.task_id == task_id, t.c.seq > after_seq)
                .order_by(t.c.seq).limit(limit)).mappings().all()
        return [EventRecord(
            task_id=r["task_id"], seq=r["seq"], kind=r["kind"], at=r["at"],
            round_number=r["round_number"], device_id=r["device_id"], reason=r["reason"],
            detail=r["detail"],
            values={str(k): float(v) for k, v in json.loads(r["values_json"]).items()},
            schema=r["schema"]) for r in rows]

    def last_event_seq(self, task_id: str) -> int:
        with self._tx() as conn:
            last = conn.execute(sa.select(sa.func.max(events_table.c.seq))
                                .where(events_table.c.task_id == task_id)).scalar()
        return int(last or 0)
