"""Participant writes in batches: ``Store.write_participants`` is the writes one by one in a
single transaction, and ``DeferredParticipantWrites`` queues admissions and reports (checked
at once) and writes them together, before anything else touches the store."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from coordinator.storage import Conflict, InMemoryStore, NotFound, SqlStore, StorageError, Store
from coordinator.storage.deferred import DeferredParticipantWrites
from coordinator.storage.records import (
    ModelVersionRecord,
    NewParticipants,
    ParticipantUpdate,
    ParticipantWrite,
)
from core.types import ParticipantState, RoundState

T0 = 1_700_000_000.0
SELECTED, REPORTED, ERRORED = (ParticipantState.SELECTED, ParticipantState.REPORTED,
                               ParticipantState.ERRORED)


def version(task_id: str, v: int) -> ModelVersionRecord:
    return ModelVersionRecord(task_id=task_id, version=v, round_number=v,
                              path=f"tasks/{task_id}/model-v{v:06d}.safetensors",
                              sha256=f"{v:064x}", size_bytes=1000, optimizer_state_path=None,
                              created_at=T0 + v)


#: A PostgreSQL server to run these on too (scripts/test-postgres.sh starts one).
POSTGRES_URL = os.environ.get("FEDCOORD_TEST_POSTGRES_URL", "")
_POSTGRES = pytest.param("postgres", marks=pytest.mark.skipif(
    not POSTGRES_URL, reason="FEDCOORD_TEST_POSTGRES_URL is not set"))


@pytest.fixture(params=["memory", "sqlite", _POSTGRES])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Store]]:
    """A factory of stores on one database (so that a second one sees what the first
    wrote, as a restarted coordinator does); on PostgreSQL in a schema of the test's own."""
    opened: list[Store] = []
    memory = InMemoryStore()
    url = f"sqlite:///{tmp_path}/db.sqlite"
    schema = f"batches_{uuid.uuid4().hex[:12]}"
    if request.param == "postgres":
        admin = sa.create_engine(POSTGRES_URL)
        with admin.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        url = sa.make_url(POSTGRES_URL).update_query_dict(
            {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)

    def make() -> Store:
        store: Store = memory if request.param == "memory" else SqlStore(url)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
    if request.param == "postgres":
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def open_round(store: Store, task_id: str = "t1") -> int:
    store.create_task(task_id, json.dumps({"name": task_id}), version(task_id, 0), T0)
    return store.open_round(task_id, 1, goal=3, started_at=T0, deadline=T0 + 60).round_id


def states(store: Store, round_id: int) -> dict[str, tuple[str, int, dict[str, float]]]:
    return {p.device_id: (p.state.value, p.num_examples, dict(p.metrics))
            for p in store.list_participants(round_id)}


def writes(round_id: int) -> list[ParticipantWrite]:
    return [
        NewParticipants(round_id, (("a", "ha"), ("b", "hb")), T0 + 1),
        NewParticipants(round_id, (("c", "hc"),), T0 + 2),
        ParticipantUpdate(round_id, "a", REPORTED, T0 + 3, 10, {"loss": 0.5}),
        ParticipantUpdate(round_id, "b", ERRORED, T0 + 4),
        NewParticipants(round_id, (("d", "hd"),), T0 + 5),
        ParticipantUpdate(round_id, "d", REPORTED, T0 + 6, 7),
        ParticipantUpdate(round_id, "d", ERRORED, T0 + 7),  # a report taken back
    ]


def test_a_batch_writes_what_the_writes_one_by_one_write(
        make_store: Callable[[], Store]) -> None:
    store = make_store()
    batched, single = open_round(store, "t1"), open_round(store, "t2")
    store.write_participants(writes(batched))
    Store.write_participants(store, [w.__class__(**{**w.__dict__, "round_id": single})
                                     for w in writes(single)])
    assert states(store, batched) == states(store, single) == {
        "a": ("reported", 10, {"loss": 0.5}), "b": ("errored", 0, {}),
        "c": ("selected", 0, {}), "d": ("errored", 7, {})}
    for round_id in (batched, single):
        rnd = store.get_round(round_id)
        assert (rnd.selected, rnd.reports) == (4, 1)
    assert store.get_participant(batched, "d").updated_at == T0 + 7


@pytest.mark.parametrize("refused, error", [
    (NewParticipants(0, (("a", "again"),), T0), Conflict),
    (ParticipantUpdate(0, "a", REPORTED, T0), Conflict),
    (ParticipantUpdate(0, "nobody", ERRORED, T0), NotFound),
])
def test_a_batch_with_a_refused_write_writes_nothing(
        make_store: Callable[[], Store], refused: ParticipantWrite,
        error: type[Exception]) -> None:
    store = make_store()
    round_id = open_round(store)
    store.write_participants(writes(round_id)[:3])
    before = states(store, round_id), store.get_round(round_id)
    with pytest.raises(error):
        store.write_participants([ParticipantUpdate(round_id, "c", REPORTED, T0 + 9),
                                  refused.__class__(**{**refused.__dict__,
                                                       "round_id": round_id})])
    assert (states(store, round_id), store.get_round(round_id)) == before


def test_deferred_writes_reach_the_database_only_when_flushed(
        make_store: Callable[[], Store]) -> None:
    inner = make_store()
    round_id = open_round(inner)
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    deferred.add_participants(round_id, [("a", "ha"), ("b", "hb")], T0 + 1)
    record = deferred.set_participant_state(round_id, "a", REPORTED, now=T0 + 2,
                                            num_examples=5, metrics={"loss": 1.0})
    assert (record.state, record.num_examples, record.token_hash) == (REPORTED, 5, "ha")
    queued = deferred.queued_seq
    assert not deferred.flushed_through(queued)
    assert inner.list_participants(round_id) == []  # nothing written yet: one commit later
    deferred.flush()
    assert deferred.flushed_through(queued)
    assert states(inner, round_id) == {"a": ("reported", 5, {"loss": 1.0}),
                                       "b": ("selected", 0, {})}
    assert inner.get_round(round_id).reports == 1


def test_deferred_writes_are_checked_when_made(make_store: Callable[[], Store]) -> None:
    inner = make_store()
    round_id = open_round(inner)
    inner.add_participants(round_id, [("early", "he")], T0)  # before deferring: loaded later
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    with pytest.raises(Conflict, match="already a participant"):
        deferred.add_participants(round_id, [("early", "again")], T0 + 1)
    deferred.add_participants(round_id, [("a", "ha")], T0 + 1)
    with pytest.raises(Conflict, match="already a participant"):
        deferred.add_participants(round_id, [("a", "again")], T0 + 1)
    with pytest.raises(NotFound, match="not a participant"):
        deferred.set_participant_state(round_id, "nobody", ERRORED, now=T0 + 2)
    deferred.set_participant_state(round_id, "a", REPORTED, now=T0 + 2)
    with pytest.raises(Conflict, match="already reported"):
        deferred.set_participant_state(round_id, "a", REPORTED, now=T0 + 3)
    deferred.flush()
    assert states(inner, round_id) == {"a": ("reported", 0, {}), "early": ("selected", 0, {})}


def test_every_other_call_sees_the_queued_writes_and_a_commit_follows_its_reports(
        make_store: Callable[[], Store]) -> None:
    inner = make_store()
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    round_id = open_round(deferred)
    deferred.add_participants(round_id, [("a", "ha"), ("b", "hb")], T0 + 1)
    assert [p.device_id for p in deferred.list_participants(round_id)] == ["a", "b"]
    deferred.set_participant_state(round_id, "a", REPORTED, now=T0 + 2, num_examples=3)
    deferred.set_participant_state(round_id, "b", REPORTED, now=T0 + 2, num_examples=4)
    deferred.set_round_state(round_id, RoundState.TRAINING, now=T0 + 3)
    assert inner.get_round(round_id).reports == 2  # written before the round moved on
    deferred.set_round_state(round_id, RoundState.AGGREGATING, now=T0 + 3)
    committed = deferred.commit_round(round_id, version("t1", 1), {}, T0 + 4)
    assert (committed.state, committed.reports) == (RoundState.COMMITTED, 2)


def test_a_crash_loses_only_the_writes_no_device_was_answered_for(
        make_store: Callable[[], Store]) -> None:
    """What a restarted coordinator reads: every flushed write (a device hears of its seat
    or its report's acceptance only after that), none of the queued ones."""
    inner = make_store()
    round_id = open_round(inner)
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    deferred.add_participants(round_id, [("answered", "h1")], T0 + 1)
    deferred.flush()
    deferred.add_participants(round_id, [("waiting", "h2")], T0 + 2)
    # The process dies here: the queue is gone with it.
    assert [p.device_id for p in make_store().list_participants(round_id)] == ["answered"]


def test_without_defer_every_write_is_its_own_transaction(
        make_store: Callable[[], Store]) -> None:
    inner = make_store()
    round_id = open_round(inner)
    deferred = DeferredParticipantWrites(inner)
    deferred.add_participants(round_id, [("a", "ha")], T0 + 1)
    deferred.set_participant_state(round_id, "a", ERRORED, now=T0 + 2)
    assert states(inner, round_id) == {"a": ("errored", 0, {})}
    assert deferred.flushed_through(deferred.queued_seq)


def test_writes_nobody_flushed_are_flushed_at_the_second_periodic_call(
        make_store: Callable[[], Store]) -> None:
    inner = make_store()
    round_id = open_round(inner)
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    deferred.add_participants(round_id, [("a", "ha")], T0 + 1)
    deferred.flush_stale()  # queued since this tick: a transport may be about to flush it
    assert inner.list_participants(round_id) == []
    deferred.flush_stale()
    assert [p.device_id for p in inner.list_participants(round_id)] == ["a"]


def test_the_periodic_flush_never_waits_for_a_flush_under_way(
        make_store: Callable[[], Store]) -> None:
    inner = make_store()
    round_id = open_round(inner)
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    deferred.add_participants(round_id, [("a", "ha")], T0 + 1)
    deferred.flush_stale()
    held = threading.Event()
    release = threading.Event()

    def flushing_elsewhere() -> None:
        with deferred._io:  # another thread's flush, stuck on the disk
            held.set()
            release.wait(10)

    other = threading.Thread(target=flushing_elsewhere)
    other.start()
    held.wait(10)
    deferred.flush_stale()  # returns at once
    release.set()
    other.join()
    assert inner.list_participants(round_id) == []
    deferred.flush_stale()  # still stale: written now
    assert [p.device_id for p in inner.list_participants(round_id)] == ["a"]


def test_a_refused_write_costs_only_its_device_whoever_flushed_it(
        make_store: Callable[[], Store]) -> None:
    """A batch the database refuses is written again one write at a time: the refused write
    is dropped and its device hears of the refusal (even when another caller's flush ran
    it, and later writes went in after it); the other devices' writes go in."""
    inner = make_store()
    round_id = open_round(inner)
    deferred = DeferredParticipantWrites(inner)
    deferred.defer()
    deferred.add_participants(round_id, [("a", "ha")], T0 + 1)  # the round's copy is loaded
    inner.add_participants(round_id, [("b", "hb")], T0 + 1)  # behind the copy's back
    deferred.add_participants(round_id, [("c", "hc")], T0 + 2)
    deferred.add_participants(round_id, [("b", "again")], T0 + 2)
    refused = deferred.queued_seq
    deferred.add_participants(round_id, [("d", "hd")], T0 + 2)
    # Another caller's flush runs the batch; it reads what went in.
    assert sorted(p.device_id for p in deferred.list_participants(round_id)) == [
        "a", "b", "c", "d"]
    assert deferred.flushed_through(refused - 1) and deferred.flushed_through(refused + 1)
    with pytest.raises(StorageError, match="refused and dropped: Conflict"):
        deferred.flushed_through(refused)
    assert {p.device_id: p.token_hash for p in inner.list_participants(round_id)}["b"] == "hb"
