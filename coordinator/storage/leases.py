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

Adding the table changes nothing the round store's schema version covers: a database with
it opens in an older fedcoord, which ignores it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

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
    """What a fenced store checks before each write: the lease ``name`` still has ``epoch``."""

    name: str
    epoch: int


class SqlLeases:
    """Leases in the database of ``engine``. Thread-safe: each call is its own transaction.

    ``clock`` (Unix seconds) judges expiry on SQLite; PostgreSQL uses its server's clock.
    Every method raises StorageError when the database fails.
    """

    def __init__(self, engine: Engine, url_for_errors: str, *,
                 clock: Callable[[], float] = time.time, owns_engine: bool = False) -> None:
        """``owns_engine``: :meth:`close` disposes of ``engine``."""
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
        the record's ``holder`` with yours."""
        with self._tx() as conn:
            now = self._now(conn)
            row = self._row(conn, name, lock=True)
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(leases_table.insert().values(
                            name=name, holder=holder, address=address, epoch=1,
                            expires_at=now + ttl_s, acquired_at=now))
                except IntegrityError:  # another replica inserted it first
                    row = self._row(conn, name, lock=True)
                    assert row is not None
                    return row
                return LeaseRecord(name, holder, address, 1, now + ttl_s, now, now)
            if row.expires_at > now:
                return row
            epoch = row.epoch + 1
            conn.execute(leases_table.update().where(leases_table.c.name == name).values(
                holder=holder, address=address, epoch=epoch, expires_at=now + ttl_s,
                acquired_at=now))
            return LeaseRecord(name, holder, address, epoch, now + ttl_s, now, now)

    def renew(self, name: str, holder: str, epoch: int, ttl_s: float) -> bool:
        """Extends ``holder``'s lease of ``epoch`` by ``ttl_s`` from now; False when the lease
        has moved on (another holder or epoch): the caller leads no more."""
        with self._tx() as conn:
            now = self._now(conn)
            done = conn.execute(leases_table.update().where(
                leases_table.c.name == name, leases_table.c.holder == holder,
                leases_table.c.epoch == epoch).values(expires_at=now + ttl_s))
            return bool(done.rowcount == 1)

    def release(self, name: str, holder: str, epoch: int) -> None:
        """Lets the lease expire now (a stopping leader: the next replica need not wait for
        the expiry). Nothing happens if the lease has moved on."""
        with self._tx() as conn:
            now = self._now(conn)
            conn.execute(leases_table.update().where(
                leases_table.c.name == name, leases_table.c.holder == holder,
                leases_table.c.epoch == epoch).values(expires_at=now))

    def current(self, name: str) -> LeaseRecord | None:
        """The lease as it stands, None if nobody ever took it."""
        with self._tx() as conn:
            return self._row(conn, name, lock=False)

    def close(self) -> None:
        """Releases the connections (of an engine of its own; else nothing)."""
        if self._owns_engine:
            self._engine.dispose()

    # -- helpers -----------------------------------------------------------------------

    def _now(self, conn: sa.Connection) -> float:
        if self._server_clock:
            return float(conn.execute(
                sa.text("SELECT EXTRACT(EPOCH FROM clock_timestamp())")).scalar_one())
        return self._clock()

    def _row(self, conn: sa.Connection, name: str, *, lock: bool) -> LeaseRecord | None:
        query = sa.select(leases_table).where(leases_table.c.name == name)
        found = conn.execute(query.with_for_update() if lock else query).first()
        if found is None:
            return None
        m = found._mapping
        return LeaseRecord(m["name"], m["holder"], m["address"], int(m["epoch"]),
                           float(m["expires_at"]), float(m["acquired_at"]), self._now(conn))

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
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(key_share=True, read=True)
    row = conn.execute(query).first()
    if row is None or int(row.epoch) != fence.epoch:
        where = f" (now epoch {row.epoch}, held at {row.address})" if row is not None else ""
        raise Fenced(f"this coordinator's leadership (lease {fence.name!r}, epoch "
                     f"{fence.epoch}) has passed to another replica{where}; the write was "
                     "refused")
