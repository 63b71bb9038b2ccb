"""The leader lease and its fencing (coordinator.storage.leases, coordinator.replication), on
SQLite and, where FEDCOORD_TEST_POSTGRES_URL names a scratch database, on PostgreSQL.

Two "replicas" here are two stores on one database, as two coordinator processes would
open it. Expiry is judged by a clock the test moves on SQLite, and by the server's clock on
PostgreSQL (there the tests use short leases and real time).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from coordinator.replication import Leadership, Role
from coordinator.storage import SqlStore
from coordinator.storage.errors import Fenced, StorageError
from coordinator.storage.leases import Fence, LeaseRecord, SqlLeases, check_fence
from core.types import RoundState
from tests.contract.test_store_contract import (
    _POSTGRES,
    T0,
    _engine,
    _fresh_postgres,
    new_task,
    open_in,
    version,
)

TTL_S = 0.5


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", _POSTGRES])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return (f"sqlite:///{tmp_path / 'coordinator.db'}" if request.param == "sqlite"
            else _fresh_postgres())


_OPENED: list[SqlLeases] = []


@pytest.fixture
def stores(backend: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    a, b = SqlStore(backend), SqlStore(backend)
    yield a, b
    while _OPENED:
        _OPENED.pop().close()
    a.close()
    b.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def leases_of(store: SqlStore, clock: Clock) -> SqlLeases:
    leases = store.leases(clock=clock)
    _OPENED.append(leases)
    return leases


def expire(clock: Clock, leases: SqlLeases) -> None:
    """Lets every lease taken so far expire (the test's clock on SQLite; real time on
    PostgreSQL, whose server clock judges)."""
    clock.now += TTL_S + 0.01
    if leases._server_clock:
        time.sleep(TTL_S + 0.05)


def test_the_first_replica_takes_the_lease_and_the_second_sees_it_held(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    a, b = (leases_of(s, clock) for s in stores)

    first = a.acquire("coordinator", "A", "host-a:1", TTL_S)
    seen = b.acquire("coordinator", "B", "host-b:2", TTL_S)

    assert (first.holder, first.epoch, first.address) == ("A", 1, "host-a:1")
    assert (seen.holder, seen.epoch, seen.address) == ("A", 1, "host-a:1")
    assert not seen.expired
    assert b.current("coordinator") is not None


def test_an_expired_lease_passes_to_another_holder_with_a_new_epoch(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    a, b = (leases_of(s, clock) for s in stores)
    a.acquire("coordinator", "A", "host-a:1", TTL_S)

    expire(clock, a)
    taken = b.acquire("coordinator", "B", "host-b:2", TTL_S)

    assert (taken.holder, taken.epoch) == ("B", 2)
    assert not a.renew("coordinator", "A", 1, TTL_S), "the old holder's renewal must fail"
    assert b.renew("coordinator", "B", 2, TTL_S)


def test_a_renewed_lease_stays_with_its_holder(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    a, b = (leases_of(s, clock) for s in stores)
    a.acquire("coordinator", "A", "host-a:1", TTL_S)

    clock.now += TTL_S / 2
    assert a.renew("coordinator", "A", 1, TTL_S)
    clock.now += TTL_S / 2 + 0.01  # past the first expiry, not the renewed one

    assert b.acquire("coordinator", "B", "host-b:2", TTL_S).holder == "A"


def test_a_released_lease_is_taken_at_once(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    a, b = (leases_of(s, clock) for s in stores)
    a.acquire("coordinator", "A", "host-a:1", 60.0)

    a.release("coordinator", "A", 1)

    assert b.acquire("coordinator", "B", "host-b:2", 60.0).holder == "B"


def test_a_deposed_leaders_writes_are_fenced_and_change_nothing(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    old, new = stores
    old_leases, new_leases = leases_of(old, clock), leases_of(new, clock)
    old_leases.acquire("coordinator", "A", "host-a:1", TTL_S)
    old.fence(Fence("coordinator", 1))
    new_task(old, "t1")
    rnd = open_in(old, "t1", RoundState.AGGREGATING)

    expire(clock, old_leases)
    assert new_leases.acquire("coordinator", "B", "host-b:2", TTL_S).epoch == 2
    new.fence(Fence("coordinator", 2))

    with pytest.raises(Fenced, match="epoch 1"):
        old.commit_round(rnd.round_id, version("t1", 1), {}, T0 + 3)
    for write in (lambda: old.set_round_state(rnd.round_id, RoundState.FAILED, now=T0),
                  lambda: old.fail_open_rounds("x", T0),
                  lambda: old.open_round("t1", 2, 3, T0, T0 + 60),
                  lambda: new_task(old, "t2")):
        with pytest.raises(Fenced):
            write()
    assert [v.version for v in new.list_model_versions("t1")] == [0]
    # The new leader recovers and commits as usual; version 1 exists exactly once.
    assert [r.round_id for r in new.fail_open_rounds("restarted", T0 + 4)] == [rnd.round_id]
    redo = open_in(new, "t1", RoundState.COMMITTED)
    assert redo.model_version == 1
    assert [v.version for v in new.list_model_versions("t1")] == [0, 1]


def test_an_unfenced_store_writes_whoever_holds_the_lease(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    store, other = stores
    leases_of(other, clock).acquire("coordinator", "B", "host-b:2", 60.0)

    new_task(store, "t1")  # a single coordinator never fences

    assert store.get_task("t1").task_id == "t1"


# -- the campaign ----------------------------------------------------------------------------


class Replica:
    """A Leadership whose steps the test drives, recording its callbacks."""

    def __init__(self, store: SqlStore, clock: Clock, address: str) -> None:
        self.elected: list[LeaseRecord] = []
        self.lost: list[str] = []
        self.monotonic = 0.0
        self.leadership = Leadership(
            leases_of(store, clock), address=address, ttl_s=TTL_S,
            on_elected=self.elected.append, on_lost=self.lost.append,
            monotonic=lambda: self.monotonic)


def test_a_standby_takes_over_when_the_leader_stops_renewing(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    a, b = Replica(stores[0], clock, "host-a:1"), Replica(stores[1], clock, "host-b:2")

    a.leadership.step()
    b.leadership.step()
    assert (a.leadership.role, b.leadership.role) == (Role.LEADER, Role.STANDBY)
    assert [e.epoch for e in a.elected] == [1] and not b.elected
    assert b.leadership.leader_address == "host-a:1"
    assert a.leadership.fence == Fence("coordinator", 1, ttl_s=TTL_S)
    assert b.leadership.fence is None

    expire(clock, a.leadership._leases)  # a hangs: no renewal within the ttl
    b.leadership.step()
    assert b.leadership.role is Role.LEADER and [e.epoch for e in b.elected] == [2]

    a.leadership.step()  # a wakes up and renews: the lease moved on
    assert a.leadership.role is Role.ENDED
    assert a.lost and "passed to another replica" in a.lost[0]
    assert a.leadership.fence is None


def test_a_leader_that_cannot_renew_for_a_ttl_gives_up(
        stores: tuple[SqlStore, SqlStore], clock: Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = Replica(stores[0], clock, "host-a:1")
    a.leadership.step()

    def unreachable(*args: object) -> bool:
        raise StorageError("database unreachable")

    monkeypatch.setattr(a.leadership._leases, "renew", unreachable)

    a.leadership.step()
    assert a.leadership.role is Role.LEADER, "one failed renewal within the ttl is retried"
    a.monotonic += TTL_S
    a.leadership.step()

    assert a.leadership.role is Role.ENDED
    assert "could not be renewed" in a.lost[0]


def test_a_stopping_leader_releases_the_lease_for_the_next(
        stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    a, b = Replica(stores[0], clock, "host-a:1"), Replica(stores[1], clock, "host-b:2")
    a.leadership.step()

    a.leadership.stop(release=True)
    b.leadership.step()

    assert b.leadership.role is Role.LEADER
    assert a.leadership.role is Role.ENDED and not a.lost


def test_lease_errors_are_storage_errors(tmp_path: Path, clock: Clock) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'c.db'}")
    leases = leases_of(store, clock)
    store.close()
    leases.close()  # no connection kept: the next call opens the file again
    (tmp_path / "c.db").unlink()
    (tmp_path / "c.db").mkdir()  # the file is now a folder: every access fails

    with pytest.raises(StorageError):
        leases.acquire("coordinator", "A", "a:1", TTL_S)


def test_replicas_opening_an_empty_database_at_once_all_open_it(backend: str) -> None:
    """Replicas started together each prepare the schema (tables of the rounds, security,
    events and leases): they take turns, and none fails on a table another just made."""
    opened: list[SqlStore] = []
    errors: list[Exception] = []

    def open_store() -> None:
        try:
            store = SqlStore(backend)
            store.security_store()
            store.event_log()
            store.leases().close()
            opened.append(store)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in opened:
        store.close()

    assert errors == []
    assert len(opened) == 4


# -- nothing waits without bound --------------------------------------------------------------


def _in_thread(call: Callable[[], object], timeout_s: float) -> list[object]:
    """Runs ``call`` on a daemon thread; returns ``[result or exception]``, or ``[]`` if it
    was still waiting after ``timeout_s`` (a call blocked without bound)."""
    done: list[object] = []

    def run() -> None:
        try:
            done.append(call())
        except Exception as exc:  # noqa: BLE001 - handed to the assertion
            done.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return done


def test_a_leader_whose_renewal_blocks_loses_its_leadership_after_a_ttl(
        stores: tuple[SqlStore, SqlStore], clock: Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a = Replica(stores[0], clock, "host-a:1")
    a.leadership.step()
    database_stalls = threading.Event()

    def blocks(*args: object) -> bool:
        database_stalls.wait(10)
        return True

    monkeypatch.setattr(a.leadership._leases, "renew", blocks)
    renewing = threading.Thread(target=a.leadership.step, daemon=True)
    renewing.start()
    try:
        assert a.leadership.check_expiry(), "within the ttl it still leads"
        a.monotonic += TTL_S

        assert not a.leadership.check_expiry()
        assert a.leadership.role is Role.ENDED and a.leadership.fence is None
        assert len(a.lost) == 1 and "not renewed" in a.lost[0]
    finally:
        database_stalls.set()
        renewing.join(5)
    assert len(a.lost) == 1, "the renewal that returned late loses nothing twice"
    assert a.leadership.role is Role.ENDED


def _postgres_only(backend: str) -> None:
    if not backend.startswith("postgresql"):
        pytest.skip("row locks and server-side timeouts: PostgreSQL")


def test_lease_calls_wait_a_bounded_time_for_a_lease_row_locked_by_a_stalled_replica(
        backend: str, stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    _postgres_only(backend)
    leases = stores[0].leases(wait_s=0.2)
    _OPENED.append(leases)
    leases.acquire("coordinator", "A", "host-a:1", 60.0)
    with _engine(backend).connect() as stalled:  # e.g. a replica frozen holding the row
        stalled.execute(sa.text(
            "SELECT 1 FROM coordinator_leases WHERE name = 'coordinator' FOR UPDATE"))

        renewal = _in_thread(lambda: leases.renew("coordinator", "A", 1, 60.0), 5.0)

        assert renewal, "the renewal waited without bound"
        assert isinstance(renewal[0], StorageError)
        stalled.rollback()
    assert leases.renew("coordinator", "A", 1, 60.0)


def test_a_leader_stalled_inside_a_fenced_write_cannot_keep_the_lease_from_a_standby(
        backend: str, stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    _postgres_only(backend)
    old, new = stores
    old_leases, new_leases = leases_of(old, clock), leases_of(new, clock)
    old_leases.acquire("coordinator", "A", "host-a:1", TTL_S)
    stalled = old._engine.connect()
    try:
        stalled.begin()
        check_fence(stalled, Fence("coordinator", 1, ttl_s=TTL_S))  # then it freezes

        def take_over() -> LeaseRecord:
            deadline = time.monotonic() + 4.0
            while True:
                try:
                    lease = new_leases.acquire("coordinator", "B", "host-b:2", TTL_S)
                except StorageError:  # the row is still locked: poll again
                    lease = None
                if lease is not None and lease.holder == "B" or time.monotonic() > deadline:
                    assert lease is not None
                    return lease
                time.sleep(0.05)

        taken = _in_thread(take_over, 6.0)

        assert taken and isinstance(taken[0], LeaseRecord), taken
        assert (taken[0].holder, taken[0].epoch) == ("B", 2)
    finally:
        with contextlib.suppress(Exception):  # the server ended its session
            stalled.close()


def test_a_lease_taken_after_waiting_for_its_row_is_not_born_expired(
        backend: str, stores: tuple[SqlStore, SqlStore], clock: Clock) -> None:
    _postgres_only(backend)
    first, second = stores
    first_leases = leases_of(first, clock)
    second_leases = second.leases(wait_s=3.0)
    _OPENED.append(second_leases)
    first_leases.acquire("coordinator", "A", "host-a:1", TTL_S)
    expire(clock, first_leases)
    with _engine(backend).connect() as other:  # e.g. a take-over under way elsewhere
        other.execute(sa.text(
            "SELECT 1 FROM coordinator_leases WHERE name = 'coordinator' FOR UPDATE"))
        waiting = threading.Thread(target=lambda: taken.append(
            second_leases.acquire("coordinator", "B", "host-b:2", TTL_S)), daemon=True)
        taken: list[LeaseRecord] = []
        waiting.start()
        time.sleep(TTL_S + 0.2)  # longer than the lease it waits to take
        other.rollback()
    waiting.join(5)

    assert taken and taken[0].holder == "B"
    assert not taken[0].expired
    assert first_leases.acquire("coordinator", "C", "host-c:3", TTL_S).holder == "B", \
        "a third replica must not take a lease just taken"
