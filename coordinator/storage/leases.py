"""Leases in the round store's database: which coordinator replica leads, and the fencing
epoch that makes a deposed leader's writes fail.

One row per lease name: its holder (an id unique to one process), the address the holder
serves on, an ``epoch`` that grows by one at every change of holder, and ``expires_at``.
The holder renews well before expiry; anyone may take a lease whose expiry has passed, and
taking it bumps the epoch. Expiry is compared with the database server's clock on
PostgreSQL (every replica reads the same clock, so the machines' clocks need not agree) and
with the caller's ``clock`` on SQLite (one machine).

Fencing: a store fenced with ``(name, epoch)`` (:meth:`SqlStore.fence
<coordinator.storage.sql.SqlStore.fence>`) checks, inside the transaction of every write that
changes rounds, tasks or versions, that the lease still has that epoch, and raises
:class:`~coordinator.storage.errors.Fenced` otherwise. On PostgreSQL the check takes a
``KEY SHARE`` lock on the lease row, which a take-over (``FOR UPDATE``) waits for and
renewals (which change no key) do not: a write either lands before the take-over, and the
new leader sees it, or fails. On SQLite every write transaction holds the database's one
write lock (``BEGIN IMMEDIATE``), which orders them the same way.

Nothing waits without bound: every lease call is one short transaction (on PostgreSQL single
statements, each committed by itself, on connections whose lock and statement waits are
limited), and a fenced write waits a bounded time for the lease row and is ended by the
server if it then stalls for a ttl (:class:`Fence`). A stalled replica holds no lock that
keeps another from leading.

Adding the table changes nothing the round store's schema version covers: a database with
it opens in an older fedcoord, which ignores it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from coordinator.storage.errors import Fenced, StorageError

metadata = sa.MetaData()

leases_table = sa.Table(
    "coordinator_leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("address", sa.String(255), nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("acquired_at", sa.Double, nullable=False),
)


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as read (times in Unix seconds of the clock that judges expiry)."""

    name: str
    holder: str
    address: str
    epoch: int
    expires_at: float
    acquired_at: float
    #: That clock's time when the record was read.
    read_at: float

    @property
    def expired(self) -> bool:
        return self.expires_at <= self.read_at


@dataclass(frozen=True)
class Fence:
    """What a fenced store checks before each write: the lease ``name`` still has ``epoch``.

    ``ttl_s`` (the lease's ttl; None: no limits) bounds, on PostgreSQL, how long the check
    waits for the lease row (``ttl_s / 3``: a take-over holds it for one statement) and how
    long the write's transaction may then sit idle before the server ends it (``ttl_s``): a
    leader that stalls inside a write cannot keep the standbys from the lease."""

    name: str
    epoch: int
    ttl_s: float | None = None


class SqlLeases:
    """Leases in the database of ``engine``. Thread-safe: each call is its own transaction.

    ``clock`` (Unix seconds) judges expiry on SQLite; PostgreSQL uses its server's clock.
    Every method raises StorageError when the database fails.
    """

    def __init__(self, engine: Engine, url_for_errors: str, *,
                 clock: Callable[[], float] = time.time, owns_engine: bool = False) -> None:
        """``owns_engine``: :meth:`close` disposes of ``engine``. On PostgreSQL the engine
        should commit each statement by itself (``AUTOCOMMIT``) and bound how long its
        statements wait (``lock_timeout``, ``statement_timeout``):
        :meth:`SqlStore.leases <coordinator.storage.sql.SqlStore.leases>` makes such an
        engine."""
        self._engine = engine
        self._owns_engine = owns_engine
        self._url = url_for_errors
        self._clock = clock
        self._server_clock = engine.dialect.name == "postgresql"
        try:
            metadata.create_all(engine)
        except SQLAlchemyError as exc:
            self.close()
            raise StorageError(f"cannot create the leases table in {self._url}: "
                               f"{type(exc).__name__}") from exc

    def acquire(self, name: str, holder: str, address: str, ttl_s: float) -> LeaseRecord:
        """Takes the lease for ``holder`` if nobody holds it or its expiry has passed (a new
        epoch), and returns it; else returns the lease as it stands (another holder). Compare
        the record's ``holder`` with yours.

        Single statements (on PostgreSQL each commits by itself): no lock on the lease row
        outlives one statement, so a replica that stalls between them blocks nobody, and the
        new expiry is reckoned from the clock read once the row is locked (a take-over that
        waited for the row is not born expired)."""
        with self._tx() as conn:
            now = self._now(conn)
            found = conn.execute(self._insert(name, holder, address, ttl_s, now)).first()
            if found is None:
                found = conn.execute(self._take_over(name, holder, address, ttl_s, now)).first()
            if found is not None:
                return _record(found._mapping)
            row = self._row(conn, name, now)
            if row is None:  # removed meanwhile (by hand): the next call inserts it
                raise StorageError(f"the lease {name!r} vanished while it was taken")
            return row

    def renew(self, name: str, holder: str, epoch: int, ttl_s: float) -> bool:
        """Extends ``holder``'s lease of ``epoch`` by ``ttl_s`` from now; False when the lease
        has moved on (another holder or epoch): the caller leads no more."""
        with self._tx() as conn:
            now = self._now(conn)
            done = conn.execute(self._mine(name, holder, epoch).values(expires_at=now + ttl_s))
            return bool(done.rowcount == 1)

    def release(self, name: str, holder: str, epoch: int) -> None:
        """Lets the lease expire now (a stopping leader: the next replica need not wait for
        the expiry). Nothing happens if the lease has moved on."""
        with self._tx() as conn:
            conn.execute(self._mine(name, holder, epoch).values(expires_at=self._now(conn)))

    def current(self, name: str) -> LeaseRecord | None:
        """The lease as it stands, None if nobody ever took it."""
        with self._tx() as conn:
            return self._row(conn, name, self._now(conn))

    def close(self) -> None:
        """Releases the connections (of an engine of its own; else nothing)."""
        if self._owns_engine:
            self._engine.dispose()

    # -- helpers -----------------------------------------------------------------------

    def _now(self, conn: sa.Connection) -> sa.ColumnElement[float]:
        """The time that judges expiry, as SQL: PostgreSQL's clock when the statement reads
        it (under the row's lock); on SQLite the caller's clock, read now (the transaction
        holds the database's write lock from its start)."""
        if self._server_clock:
            return sa.cast(sa.extract("epoch", sa.func.clock_timestamp()), sa.Double)
        return sa.literal(self._clock(), sa.Double)

    def _insert(self, name: str, holder: str, address: str, ttl_s: float,
                now: sa.ColumnElement[float]) -> sa.Executable:
        insert = pg_insert if self._server_clock else sqlite_insert
        return insert(leases_table).values(
            name=name, holder=holder, address=address, epoch=1, expires_at=now + ttl_s,
            acquired_at=now,
        ).on_conflict_do_nothing().returning(*leases_table.c, now.label("read_at"))

    def _take_over(self, name: str, holder: str, address: str, ttl_s: float,
                   now: sa.ColumnElement[float]) -> sa.Executable:
        # FOR UPDATE (which a fenced write's KEY SHARE holds off; an UPDATE that changes no
        # key would not wait for it), and only of an expired lease: a poll of a live lease
        # locks nothing. The expiry is tested again once the row is locked.
        expired = leases_table.c.expires_at <= now
        locked = (sa.select(leases_table.c.name)
                  .where(leases_table.c.name == name, expired)
                  .with_for_update().cte("locked"))
        return (leases_table.update()
                .where(leases_table.c.name.in_(sa.select(locked.c.name)), expired)
                .values(epoch=leases_table.c.epoch + 1, holder=holder, address=address,
                        expires_at=now + ttl_s, acquired_at=now)
                .returning(*leases_table.c, now.label("read_at")))

    @staticmethod
    def _mine(name: str, holder: str, epoch: int) -> sa.Update:
        return leases_table.update().where(
            leases_table.c.name == name, leases_table.c.holder == holder,
            leases_table.c.epoch == epoch)

    @staticmethod
    def _row(conn: sa.Connection, name: str,
             now: sa.ColumnElement[float]) -> LeaseRecord | None:
        found = conn.execute(sa.select(*leases_table.c, now.label("read_at"))
                             .where(leases_table.c.name == name)).first()
        return None if found is None else _record(found._mapping)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise StorageError(f"database {self._url} failed (leases): "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def check_fence(conn: sa.Connection, fence: Fence) -> None:
    """Raises Fenced unless lease ``fence.name`` still has ``fence.epoch`` (inside the
    caller's write transaction; see the module docstring for the locks)."""
    query = sa.select(leases_table.c.epoch, leases_table.c.address).where(
        leases_table.c.name == fence.name)
    postgres = conn.dialect.name == "postgresql"
    limited = postgres and fence.ttl_s is not None
    if postgres:
        query = query.with_for_update(key_share=True, read=True)
    if limited:
        assert fence.ttl_s is not None
        conn.execute(sa.text(
            "SELECT set_config('lock_timeout', :wait, true), "
            "set_config('idle_in_transaction_session_timeout', :idle, true)"),
            {"wait": f"{_ms(fence.ttl_s / 3)}ms", "idle": f"{_ms(fence.ttl_s)}ms"})
    row = conn.execute(query).first()
    if limited:  # the write's own locks wait as they did
        conn.execute(sa.text("SET LOCAL lock_timeout TO DEFAULT"))
    if row is None or int(row.epoch) != fence.epoch:
        where = f" (now epoch {row.epoch}, held at {row.address})" if row is not None else ""
        raise Fenced(f"this coordinator's leadership (lease {fence.name!r}, epoch "
                     f"{fence.epoch}) has passed to another replica{where}; the write was "
                     "refused")


def _record(m: sa.RowMapping) -> LeaseRecord:
    return LeaseRecord(m["name"], m["holder"], m["address"], int(m["epoch"]),
                       float(m["expires_at"]), float(m["acquired_at"]), float(m["read_at"]))


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
