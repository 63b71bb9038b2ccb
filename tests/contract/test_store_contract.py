"""The Store contract: what every implementation guarantees, checked against each of them.

Backends: InMemoryStore; SqlStore on a temporary SQLite file; SqlStore on PostgreSQL when
FEDCOORD_TEST_POSTGRES_URL names a scratch database (its tables are dropped before each
test) and a PostgreSQL driver is installed.

The last part holds what only the SQL store promises: persistence across a restart, rules
enforced by the database itself, all-or-nothing transactions, concurrent callers, and its
refusals at start-up.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.storage import (
    Conflict,
    InMemoryStore,
    ModelVersionRecord,
    NotFound,
    RoundRecord,
    SqlStore,
    StorageError,
    Store,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState

SELECTING, TRAINING, AGGREGATING, COMMITTED, FAILED = (
    RoundState.SELECTING,
    RoundState.TRAINING,
    RoundState.AGGREGATING,
    RoundState.COMMITTED,
    RoundState.FAILED,
)

#: The round state machine, as the specification states it: set_round_state accepts exactly
#: these; COMMITTED is reached only through commit_round, from AGGREGATING.
ALLOWED = {
    (SELECTING, TRAINING),
    (SELECTING, FAILED),
    (TRAINING, AGGREGATING),
    (TRAINING, FAILED),
    (AGGREGATING, FAILED),
}


def _by_value(pair: tuple[RoundState, RoundState]) -> tuple[str, str]:
    return pair[0].value, pair[1].value


def _arrow(pair: tuple[RoundState, RoundState]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


ALLOWED_LIST = sorted(ALLOWED, key=_by_value)
NOT_ALLOWED = sorted(
    ((a, b) for a in RoundState for b in RoundState if (a, b) not in ALLOWED), key=_by_value
)

POSTGRES_URL = os.environ.get("FEDCOORD_TEST_POSTGRES_URL", "")
_HAS_PG_DRIVER = any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2"))
_POSTGRES = pytest.param(
    "postgres",
    marks=pytest.mark.skipif(
        not (POSTGRES_URL and _HAS_PG_DRIVER),
        reason="set FEDCOORD_TEST_POSTGRES_URL and install psycopg to test on PostgreSQL",
    ),
)


def _engine(url: str) -> sa.Engine:
    """An engine of our own on the store's database (bare postgresql:// means psycopg 3, as
    in SqlStore)."""
    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed)


def _fresh_postgres() -> str:
    """The scratch database's URL, emptied. Under pytest-xdist each worker gets a schema of
    its own (``search_path`` in the URL's connection options), so workers never drop each
    other's tables."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    url = POSTGRES_URL
    if worker:
        schema = f"fedcoord_{re.sub(r'[^a-z0-9_]', '_', worker.lower())}"
        admin = _engine(POSTGRES_URL)
        try:
            with admin.begin() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        finally:
            admin.dispose()
        url = sa.make_url(POSTGRES_URL).update_query_dict(
            {"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    engine = _engine(url)
    try:
        existing = sa.MetaData()
        existing.reflect(engine)
        existing.drop_all(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", _POSTGRES])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'coordinator.db'}"
    return _fresh_postgres()


@pytest.fixture(params=["memory", "sqlite", _POSTGRES])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        s: Store = InMemoryStore()
    elif request.param == "sqlite":
        s = SqlStore(f"sqlite:///{tmp_path / 'coordinator.db'}")
    else:
        s = SqlStore(_fresh_postgres())
    yield s
    s.close()


# -- helpers -------------------------------------------------------------------------------

T0 = 1_700_000_000.0


def version(task_id: str, v: int, round_number: int | None = None) -> ModelVersionRecord:
    return ModelVersionRecord(
        task_id=task_id,
        version=v,
        round_number=v if round_number is None else round_number,
        path=f"tasks/{task_id}/model-v{v:06d}.safetensors",
        sha256=f"{v:064x}",
        size_bytes=1000 + v,
        optimizer_state_path=None if v == 0 else f"tasks/{task_id}/opt-v{v:06d}.safetensors",
        created_at=T0 + v,
    )


def new_task(store: Store, task_id: str = "t1", now: float = T0) -> TaskRecord:
    return store.create_task(task_id, json.dumps({"name": task_id}), version(task_id, 0), now)


def open_in(store: Store, task_id: str, state: RoundState, round_number: int = 1) -> RoundRecord:
    """A new attempt of ``round_number`` driven to ``state`` along allowed transitions."""
    rnd = store.open_round(task_id, round_number, goal=3, started_at=T0, deadline=T0 + 60)
    path = {
        SELECTING: [],
        TRAINING: [TRAINING],
        AGGREGATING: [TRAINING, AGGREGATING],
        FAILED: [FAILED],
        COMMITTED: [TRAINING, AGGREGATING],
    }[state]
    for s in path:
        rnd = store.set_round_state(rnd.round_id, s, now=T0 + 1)
    if state is COMMITTED:
        rnd = store.commit_round(
            rnd.round_id,
            version(task_id, store.get_task(task_id).model_version + 1, round_number),
            {},
            T0 + 2,
        )
    assert rnd.state is state
    return rnd


def snapshot(store: Store, task_id: str) -> dict[str, Any]:
    """Everything the store holds about a task, to check that a refused call changed nothing."""
    rounds = store.list_rounds(task_id)
    return {
        "task": store.get_task(task_id),
        "rounds": rounds,
        "participants": {r.round_id: store.list_participants(r.round_id) for r in rounds},
        "versions": store.list_model_versions(task_id),
    }


# -- tasks ---------------------------------------------------------------------------------


def test_a_new_task_is_running_at_version_0_with_its_initial_model(store: Store) -> None:
    task = new_task(store, "t1", now=T0)

    assert task == TaskRecord(
        task_id="t1",
        spec_json='{"name": "t1"}',
        state=TaskState.RUNNING,
        created_at=T0,
        rounds_committed=0,
        model_version=0,
        reason="",
    )
    assert store.get_task("t1") == task
    assert store.list_model_versions("t1") == [version("t1", 0)]
    assert store.latest_model_version("t1") == version("t1", 0)
    assert store.list_rounds("t1") == []
    assert store.open_round_of("t1") is None


def test_the_task_spec_is_kept_as_opaque_text(store: Store) -> None:
    spec_json = '{"name": "ünïcode ✓", "x": [' + ", ".join(["1.5"] * 20_000) + "]}"
    store.create_task("t1", spec_json, version("t1", 0), T0)

    assert store.get_task("t1").spec_json == spec_json


def test_creating_a_task_twice_conflicts_and_keeps_the_first(store: Store) -> None:
    new_task(store, "t1", now=T0)

    with pytest.raises(Conflict):
        store.create_task("t1", "{}", version("t1", 0), T0 + 5)

    assert store.get_task("t1").created_at == T0
    assert store.list_model_versions("t1") == [version("t1", 0)]


def test_a_task_cannot_be_created_with_the_model_of_another_task(store: Store) -> None:
    with pytest.raises(ValueError):
        store.create_task("t1", "{}", version("other", 0), T0)

    assert store.list_tasks() == []


def test_an_unknown_task_is_not_found(store: Store) -> None:
    new_task(store, "t1")

    for call in (
        lambda: store.get_task("nope"),
        lambda: store.set_task_state("nope", TaskState.CANCELLED),
        lambda: store.open_round("nope", 1, 3, T0, T0 + 60),
        lambda: store.list_rounds("nope"),
        lambda: store.open_round_of("nope"),
        lambda: store.get_model_version("nope", 0),
        lambda: store.latest_model_version("nope"),
        lambda: store.list_model_versions("nope"),
    ):
        with pytest.raises(NotFound):
            call()


def test_tasks_are_listed_oldest_first(store: Store) -> None:
    new_task(store, "b", now=T0 + 2)
    new_task(store, "c", now=T0)
    new_task(store, "a", now=T0 + 1)

    assert [t.task_id for t in store.list_tasks()] == ["c", "a", "b"]


def test_set_task_state_records_the_state_and_its_reason(store: Store) -> None:
    new_task(store, "t1")

    failed = store.set_task_state("t1", TaskState.FAILED, "3 attempts in a row failed")
    assert (failed.state, failed.reason) == (TaskState.FAILED, "3 attempts in a row failed")
    assert store.get_task("t1") == failed

    done = store.set_task_state("t1", TaskState.COMPLETED)
    assert (done.state, done.reason) == (TaskState.COMPLETED, "")


# -- opening rounds ------------------------------------------------------------------------


def test_open_round_starts_attempt_1_selecting(store: Store) -> None:
    new_task(store, "t1")

    rnd = store.open_round("t1", 1, goal=5, started_at=T0 + 10, deadline=T0 + 70)

    assert rnd == RoundRecord(
        round_id=rnd.round_id,
        task_id="t1",
        round_number=1,
        attempt=1,
        state=SELECTING,
        goal=5,
        started_at=T0 + 10,
        deadline=T0 + 70,
        ended_at=None,
        selected=0,
        reports=0,
        failure_reason="",
        model_version=None,
        metrics={},
    )
    assert store.get_round(rnd.round_id) == rnd
    assert store.open_round_of("t1") == rnd
    assert store.list_rounds("t1") == [rnd]


def test_a_task_has_at_most_one_open_round(store: Store) -> None:
    new_task(store, "t1")
    for state in (SELECTING, TRAINING, AGGREGATING):
        rnd = open_in(store, "t1", state)
        before = snapshot(store, "t1")

        with pytest.raises(Conflict):
            store.open_round("t1", 2, 3, T0, T0 + 60)

        assert snapshot(store, "t1") == before
        store.set_round_state(rnd.round_id, FAILED, now=T0 + 3)


def test_a_committed_round_number_cannot_be_opened_again(store: Store) -> None:
    new_task(store, "t1")
    open_in(store, "t1", COMMITTED, round_number=1)

    with pytest.raises(Conflict, match="committed"):
        store.open_round("t1", 1, 3, T0, T0 + 60)

    assert store.open_round_of("t1") is None
    assert store.open_round("t1", 2, 3, T0, T0 + 60).round_number == 2


@pytest.mark.parametrize("state", [s for s in TaskState if s.is_final])
def test_rounds_open_only_while_the_task_is_running(store: Store, state: TaskState) -> None:
    new_task(store, "t1")
    store.set_task_state("t1", state, "over")

    with pytest.raises(Conflict, match=state.value):
        store.open_round("t1", 1, 3, T0, T0 + 60)

    assert store.list_rounds("t1") == []


def test_attempts_are_numbered_per_round_number(store: Store) -> None:
    new_task(store, "t1")
    open_in(store, "t1", FAILED, round_number=1)
    open_in(store, "t1", FAILED, round_number=1)
    third = open_in(store, "t1", COMMITTED, round_number=1)
    second_round = open_in(store, "t1", SELECTING, round_number=2)

    assert third.attempt == 3
    assert second_round.attempt == 1
    assert [(r.round_number, r.attempt, r.state) for r in store.list_rounds("t1")] == [
        (1, 1, FAILED),
        (1, 2, FAILED),
        (1, 3, COMMITTED),
        (2, 1, SELECTING),
    ]


def test_rounds_are_listed_by_number_then_attempt_whatever_the_order_they_opened_in(
    store: Store,
) -> None:
    new_task(store, "t1")
    open_in(store, "t1", FAILED, round_number=2)
    open_in(store, "t1", FAILED, round_number=1)
    open_in(store, "t1", FAILED, round_number=2)

    assert [(r.round_number, r.attempt) for r in store.list_rounds("t1")] == [
        (1, 1),
        (2, 1),
        (2, 2),
    ]


def test_round_ids_are_unique_across_tasks(store: Store) -> None:
    new_task(store, "t1")
    new_task(store, "t2")
    ids = [open_in(store, t, FAILED).round_id for t in ("t1", "t2", "t1", "t2")]

    assert len(set(ids)) == 4
    assert {r.task_id for r in store.list_rounds("t1")} == {"t1"}


def test_open_round_of_is_the_round_not_final(store: Store) -> None:
    new_task(store, "t1")
    new_task(store, "t2")
    open_in(store, "t1", FAILED)
    rnd = open_in(store, "t1", TRAINING)
    open_in(store, "t2", SELECTING)

    assert store.open_round_of("t1") == rnd
    store.set_round_state(rnd.round_id, FAILED, now=T0 + 5)
    assert store.open_round_of("t1") is None


def test_an_unknown_round_is_not_found(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", AGGREGATING)
    missing = rnd.round_id + 1000

    for call in (
        lambda: store.get_round(missing),
        lambda: store.set_round_state(missing, FAILED, now=T0),
        lambda: store.add_participants(missing, [("d1", "h1")], T0),
        lambda: store.list_participants(missing),
        lambda: store.get_participant(missing, "d1"),
        lambda: store.commit_round(missing, version("t1", 1), {}, T0),
        lambda: store.update_round_metrics(missing, {"loss": 1.0}),
    ):
        with pytest.raises(NotFound):
            call()


# -- round transitions ---------------------------------------------------------------------


@pytest.mark.parametrize(("current", "new"), ALLOWED_LIST, ids=map(_arrow, ALLOWED_LIST))
def test_allowed_transitions_are_applied(
    store: Store, current: RoundState, new: RoundState
) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", current)

    moved = store.set_round_state(rnd.round_id, new, now=T0 + 30)

    assert moved.state is new
    assert moved.ended_at == (T0 + 30 if new.is_final else None)
    assert store.get_round(rnd.round_id) == moved


@pytest.mark.parametrize(("current", "new"), NOT_ALLOWED, ids=map(_arrow, NOT_ALLOWED))
def test_other_transitions_conflict_naming_both_states_and_change_nothing(
    store: Store, current: RoundState, new: RoundState
) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", current)
    before = snapshot(store, "t1")

    with pytest.raises(Conflict) as refused:
        store.set_round_state(rnd.round_id, new, now=T0 + 30, failure_reason="x", deadline=1.0)

    assert current.value in str(refused.value)
    assert new.value in str(refused.value)
    assert snapshot(store, "t1") == before


def test_a_transition_may_move_the_deadline(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", SELECTING)

    training = store.set_round_state(rnd.round_id, TRAINING, now=T0 + 5, deadline=T0 + 95)
    assert training.deadline == T0 + 95
    aggregating = store.set_round_state(rnd.round_id, AGGREGATING, now=T0 + 6)
    assert aggregating.deadline == T0 + 95


def test_a_failed_round_keeps_its_reason_and_end_time(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", TRAINING)

    failed = store.set_round_state(
        rnd.round_id, FAILED, now=T0 + 42, failure_reason="deadline with 1 of 2 reports"
    )

    assert (failed.state, failed.ended_at, failed.failure_reason) == (
        FAILED,
        T0 + 42,
        "deadline with 1 of 2 reports",
    )
    assert store.get_round(rnd.round_id) == failed


_prop_task_ids = (f"prop-{i}" for i in itertools.count())
COMMIT = "commit"  # a step of the property test: commit_round rather than set_round_state


def _step(store: Store, rnd: RoundRecord, step: RoundState | str, now: float) -> RoundRecord:
    if step == COMMIT:
        return store.commit_round(rnd.round_id, version(rnd.task_id, 1), {}, now)
    assert isinstance(step, RoundState)
    return store.set_round_state(rnd.round_id, step, now=now)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=st.lists(st.sampled_from([*RoundState, COMMIT]), max_size=8))
def test_the_store_accepts_exactly_the_allowed_transitions(
    store: Store, steps: list[RoundState | str]
) -> None:
    task_id = next(_prop_task_ids)  # the store outlives the examples; each gets a new task
    new_task(store, task_id)
    rnd = store.open_round(task_id, 1, 3, T0, T0 + 60)
    state = SELECTING
    for i, step in enumerate(steps):
        if step == COMMIT:
            target, allowed = COMMITTED, state is AGGREGATING
        else:
            assert isinstance(step, RoundState)
            target, allowed = step, (state, step) in ALLOWED
        if allowed:
            assert _step(store, rnd, step, T0 + i).state is target
            state = target
        else:
            with pytest.raises(Conflict):
                _step(store, rnd, step, T0 + i)
        assert store.get_round(rnd.round_id).state is state
    assert store.get_task(task_id).rounds_committed == (1 if state is COMMITTED else 0)


# -- participants --------------------------------------------------------------------------


def test_added_participants_are_selected_and_counted(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", SELECTING)

    store.add_participants(rnd.round_id, [("d2", "h2"), ("d1", "h1")], T0 + 1)
    store.add_participants(rnd.round_id, [("d3", "h3")], T0 + 2)

    listed = store.list_participants(rnd.round_id)
    assert [(p.device_id, p.token_hash, p.state, p.updated_at) for p in listed] == [
        ("d1", "h1", ParticipantState.SELECTED, T0 + 1),
        ("d2", "h2", ParticipantState.SELECTED, T0 + 1),
        ("d3", "h3", ParticipantState.SELECTED, T0 + 2),
    ]
    assert all(p.num_examples == 0 and dict(p.metrics) == {} for p in listed)
    assert store.get_participant(rnd.round_id, "d2") == listed[1]
    assert store.get_round(rnd.round_id).selected == 3


def test_participants_may_join_while_training(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", TRAINING)

    store.add_participants(rnd.round_id, [("late", "h")], T0 + 1)

    assert store.get_round(rnd.round_id).selected == 1


def test_adding_no_participants_changes_nothing(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", SELECTING)

    store.add_participants(rnd.round_id, [], T0)

    assert store.get_round(rnd.round_id) == rnd


@pytest.mark.parametrize(
    "batch",
    [[("d9", "h9"), ("d1", "again")], [("d9", "h9"), ("d9", "twice in one batch")]],
    ids=["already-a-participant", "listed-twice"],
)
def test_a_device_joins_a_round_once_and_a_refused_batch_adds_no_one(
    store: Store, batch: list[tuple[str, str]]
) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", SELECTING)
    store.add_participants(rnd.round_id, [("d1", "h1")], T0)
    before = snapshot(store, "t1")

    with pytest.raises(Conflict):
        store.add_participants(rnd.round_id, batch, T0 + 1)

    assert snapshot(store, "t1") == before
    assert store.get_round(rnd.round_id).selected == 1


def test_a_device_may_take_part_in_several_rounds(store: Store) -> None:
    new_task(store, "t1")
    first = open_in(store, "t1", SELECTING)
    store.add_participants(first.round_id, [("d1", "h1")], T0)
    store.set_round_state(first.round_id, FAILED, now=T0 + 1)
    second = open_in(store, "t1", SELECTING)

    store.add_participants(second.round_id, [("d1", "h2")], T0 + 2)

    assert store.get_participant(first.round_id, "d1").token_hash == "h1"
    assert store.get_participant(second.round_id, "d1").token_hash == "h2"


@pytest.mark.parametrize("state", [COMMITTED, FAILED])
def test_no_one_joins_a_final_round(store: Store, state: RoundState) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", state)

    with pytest.raises(Conflict):
        store.add_participants(rnd.round_id, [("d1", "h1")], T0)

    assert store.list_participants(rnd.round_id) == []


def test_a_device_that_is_not_a_participant_is_not_found(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", SELECTING)
    store.add_participants(rnd.round_id, [("d1", "h1")], T0)

    with pytest.raises(NotFound):
        store.get_participant(rnd.round_id, "d2")
    with pytest.raises(NotFound):
        store.set_participant_state(rnd.round_id, "d2", ParticipantState.REPORTED, now=T0)


def test_a_report_is_recorded_with_its_examples_and_metrics_and_counted(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", TRAINING)
    store.add_participants(rnd.round_id, [("d1", "h1"), ("d2", "h2")], T0)

    reported = store.set_participant_state(
        rnd.round_id,
        "d1",
        ParticipantState.REPORTED,
        now=T0 + 9,
        num_examples=120,
        metrics={"train_loss": 0.5, "train_accuracy": 0.75},
    )

    assert (reported.state, reported.num_examples, reported.updated_at) == (
        ParticipantState.REPORTED,
        120,
        T0 + 9,
    )
    assert dict(reported.metrics) == {"train_loss": 0.5, "train_accuracy": 0.75}
    assert store.get_participant(rnd.round_id, "d1") == reported
    assert store.get_round(rnd.round_id).reports == 1


def test_a_device_reports_once(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", TRAINING)
    store.add_participants(rnd.round_id, [("d1", "h1")], T0)
    store.set_participant_state(rnd.round_id, "d1", ParticipantState.REPORTED, now=T0,
                                num_examples=10)
    before = snapshot(store, "t1")

    with pytest.raises(Conflict):
        store.set_participant_state(rnd.round_id, "d1", ParticipantState.REPORTED, now=T0 + 1,
                                    num_examples=99)

    assert snapshot(store, "t1") == before


def test_reports_counts_the_participants_in_state_reported(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", TRAINING)
    store.add_participants(rnd.round_id, [(f"d{i}", "h") for i in range(4)], T0)
    rid = rnd.round_id

    store.set_participant_state(rid, "d0", ParticipantState.REPORTED, now=T0)
    store.set_participant_state(rid, "d1", ParticipantState.REJECTED, now=T0)
    store.set_participant_state(rid, "d2", ParticipantState.ERRORED, now=T0)
    store.set_participant_state(rid, "d3", ParticipantState.REPORTED, now=T0)
    assert store.get_round(rid).reports == 2

    store.set_participant_state(rid, "d3", ParticipantState.REJECTED, now=T0)
    assert store.get_round(rid).reports == 1
    assert store.get_round(rid).selected == 4


def test_unspecified_examples_and_metrics_keep_their_stored_values(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", TRAINING)
    store.add_participants(rnd.round_id, [("d1", "h1")], T0)
    store.set_participant_state(rnd.round_id, "d1", ParticipantState.REPORTED, now=T0,
                                num_examples=7, metrics={"loss": 2.0})

    kept = store.set_participant_state(rnd.round_id, "d1", ParticipantState.REJECTED, now=T0 + 1)
    assert (kept.num_examples, dict(kept.metrics)) == (7, {"loss": 2.0})

    cleared = store.set_participant_state(rnd.round_id, "d1", ParticipantState.ERRORED,
                                          now=T0 + 2, metrics={})
    assert dict(cleared.metrics) == {}


def test_participants_of_a_round_without_any_is_empty(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", SELECTING)

    assert store.list_participants(rnd.round_id) == []


# -- commits and model versions ------------------------------------------------------------


def test_commit_records_the_version_and_advances_the_task(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", AGGREGATING)
    v1 = version("t1", 1, round_number=1)

    committed = store.commit_round(rnd.round_id, v1, {"reports": 3, "train_loss": 0.25}, T0 + 50)

    assert (committed.state, committed.model_version, committed.ended_at) == (
        COMMITTED,
        1,
        T0 + 50,
    )
    assert dict(committed.metrics) == {"reports": 3.0, "train_loss": 0.25}
    assert all(isinstance(v, float) for v in committed.metrics.values())
    assert store.get_round(rnd.round_id) == committed
    task = store.get_task("t1")
    assert (task.model_version, task.rounds_committed) == (1, 1)
    assert store.get_model_version("t1", 1) == v1
    assert store.latest_model_version("t1") == v1
    assert store.list_model_versions("t1") == [version("t1", 0), v1]
    assert store.open_round_of("t1") is None


def test_model_versions_are_listed_in_order(store: Store) -> None:
    new_task(store, "t1")
    for n in (1, 2, 3):
        open_in(store, "t1", COMMITTED, round_number=n)

    assert [v.version for v in store.list_model_versions("t1")] == [0, 1, 2, 3]
    assert store.latest_model_version("t1").version == 3
    assert store.get_task("t1").rounds_committed == 3


def test_an_unknown_model_version_is_not_found(store: Store) -> None:
    new_task(store, "t1")

    with pytest.raises(NotFound):
        store.get_model_version("t1", 1)


@pytest.mark.parametrize("state", [SELECTING, TRAINING, FAILED, COMMITTED])
def test_only_an_aggregating_round_commits_and_a_refused_commit_writes_nothing(
    store: Store, state: RoundState
) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", state)
    before = snapshot(store, "t1")

    with pytest.raises(Conflict, match=state.value):
        store.commit_round(rnd.round_id, version("t1", 7, 1), {"reports": 1}, T0 + 50)

    assert snapshot(store, "t1") == before


def test_a_commit_with_an_existing_version_number_conflicts_and_writes_nothing(
    store: Store,
) -> None:
    new_task(store, "t1")
    open_in(store, "t1", COMMITTED, round_number=1)
    rnd = open_in(store, "t1", AGGREGATING, round_number=2)
    before = snapshot(store, "t1")

    with pytest.raises(Conflict):
        store.commit_round(rnd.round_id, version("t1", 1, round_number=2), {}, T0 + 50)

    assert snapshot(store, "t1") == before


@pytest.mark.parametrize(
    "wrong", [version("other", 1, 1), version("t1", 1, 2)], ids=["other-task", "other-round"]
)
def test_a_commit_of_a_version_made_for_something_else_is_a_bug_and_writes_nothing(
    store: Store, wrong: ModelVersionRecord
) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", AGGREGATING, round_number=1)
    before = snapshot(store, "t1")

    with pytest.raises(ValueError):
        store.commit_round(rnd.round_id, wrong, {}, T0 + 50)

    assert snapshot(store, "t1") == before


def test_update_round_metrics_merges_into_the_stored_ones(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", AGGREGATING)
    store.commit_round(rnd.round_id, version("t1", 1), {"reports": 3, "loss": 0.5}, T0 + 50)

    updated = store.update_round_metrics(rnd.round_id, {"loss": 0.4, "server_eval_accuracy": 0.9})

    assert dict(updated.metrics) == {"reports": 3.0, "loss": 0.4, "server_eval_accuracy": 0.9}
    assert store.get_round(rnd.round_id) == updated
    assert updated.state is COMMITTED


def test_records_cannot_be_changed_by_their_holder(store: Store) -> None:
    new_task(store, "t1")
    rnd = open_in(store, "t1", AGGREGATING)
    committed = store.commit_round(rnd.round_id, version("t1", 1), {"loss": 0.5}, T0)

    with pytest.raises(TypeError):
        committed.metrics["loss"] = 0.0  # type: ignore[index]
    assert store.get_round(rnd.round_id).metrics["loss"] == 0.5


# -- recovery ------------------------------------------------------------------------------


def test_fail_open_rounds_fails_every_round_not_final_and_returns_them(store: Store) -> None:
    for t in ("t1", "t2", "t3", "t4"):
        new_task(store, t)
    committed = open_in(store, "t1", COMMITTED)
    selecting = open_in(store, "t1", SELECTING, round_number=2)
    training = open_in(store, "t2", TRAINING)
    aggregating = open_in(store, "t3", AGGREGATING)
    failed = open_in(store, "t4", FAILED)

    result = store.fail_open_rounds("coordinator restarted", now=T0 + 500)

    assert [r.round_id for r in result] == sorted(
        r.round_id for r in (selecting, training, aggregating)
    )
    for r in result:
        assert (r.state, r.failure_reason, r.ended_at) == (
            FAILED,
            "coordinator restarted",
            T0 + 500,
        )
        assert store.get_round(r.round_id) == r
    assert store.get_round(committed.round_id) == committed
    assert store.get_round(failed.round_id) == failed
    assert all(store.open_round_of(t) is None for t in ("t1", "t2", "t3", "t4"))
    assert store.fail_open_rounds("again", now=T0 + 600) == []


def test_after_recovery_the_interrupted_round_is_redone_as_a_new_attempt(store: Store) -> None:
    new_task(store, "t1")
    open_in(store, "t1", TRAINING, round_number=1)
    store.fail_open_rounds("coordinator restarted", now=T0 + 5)

    redo = store.open_round("t1", 1, 3, T0 + 6, T0 + 66)

    assert (redo.round_number, redo.attempt, redo.state) == (1, 2, SELECTING)


# -- SqlStore only -------------------------------------------------------------------------


def _full_history(store: Store) -> dict[str, Any]:
    return {task.task_id: snapshot(store, task.task_id) for task in store.list_tasks()}


def test_sql_store_keeps_everything_across_a_restart(sql_url: str) -> None:
    store = SqlStore(sql_url)
    new_task(store, "t1")
    new_task(store, "t2", now=T0 + 1)
    rnd = open_in(store, "t1", TRAINING)
    store.add_participants(rnd.round_id, [("d1", "h1"), ("d2", "h2")], T0)
    store.set_participant_state(rnd.round_id, "d1", ParticipantState.REPORTED, now=T0 + 3,
                                num_examples=5, metrics={"loss": 1.25})
    store.set_round_state(rnd.round_id, AGGREGATING, now=T0 + 4)
    store.commit_round(rnd.round_id, version("t1", 1), {"reports": 1.0}, T0 + 5)
    open_in(store, "t1", SELECTING, round_number=2)
    store.set_task_state("t2", TaskState.CANCELLED, "by an operator")
    before = _full_history(store)
    store.close()

    reopened = SqlStore(sql_url)
    try:
        assert _full_history(reopened) == before
        assert reopened.get_task("t1").model_version == 1
        reopened.fail_open_rounds("restarted", T0 + 10)
        redo = reopened.open_round("t1", 2, 3, T0 + 11, T0 + 71)
        assert redo.attempt == 2
        assert redo.round_id not in {r.round_id for r in before["t1"]["rounds"]}
    finally:
        reopened.close()


def test_sql_store_creates_the_directory_of_a_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "coordinator.db"

    SqlStore(f"sqlite:///{db}").close()

    assert db.is_file()


def test_sql_store_runs_sqlite_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    SqlStore(f"sqlite:///{db}").close()

    with _raw(f"sqlite:///{db}") as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.fixture
def committed_twice_setup(sql_url: str) -> Iterator[tuple[SqlStore, RoundRecord, RoundRecord]]:
    """Round 1 of t1: attempt 1 failed, attempt 2 committed."""
    store = SqlStore(sql_url)
    new_task(store, "t1")
    failed = open_in(store, "t1", FAILED, round_number=1)
    committed = open_in(store, "t1", COMMITTED, round_number=1)
    yield store, failed, committed
    store.close()


def test_the_database_itself_refuses_a_second_commit_of_a_round_number(
    sql_url: str, committed_twice_setup: tuple[SqlStore, RoundRecord, RoundRecord]
) -> None:
    _, failed, _ = committed_twice_setup

    with pytest.raises(sa.exc.IntegrityError), _raw(sql_url) as conn:
        conn.execute(
            sa.text("UPDATE rounds SET state = 'committed' WHERE round_id = :id"),
            {"id": failed.round_id},
        )


def test_the_database_itself_refuses_a_second_open_round(sql_url: str) -> None:
    store = SqlStore(sql_url)
    new_task(store, "t1")
    failed = open_in(store, "t1", FAILED)
    open_in(store, "t1", TRAINING)
    store.close()

    with pytest.raises(sa.exc.IntegrityError), _raw(sql_url) as conn:
        conn.execute(
            sa.text("UPDATE rounds SET state = 'selecting' WHERE round_id = :id"),
            {"id": failed.round_id},
        )


def test_the_database_itself_refuses_a_duplicate_model_version(sql_url: str) -> None:
    store = SqlStore(sql_url)
    new_task(store, "t1")
    store.close()

    with pytest.raises(sa.exc.IntegrityError), _raw(sql_url) as conn:
        conn.execute(
            sa.text(
                "INSERT INTO model_versions (task_id, version, round_number, path, sha256, "
                "size_bytes, optimizer_state_path, created_at) "
                "VALUES ('t1', 0, 0, 'x', 'y', 1, NULL, 0)"
            )
        )


def test_the_database_itself_refuses_an_unknown_state_name(sql_url: str) -> None:
    store = SqlStore(sql_url)
    new_task(store, "t1")
    store.close()

    with pytest.raises(sa.exc.IntegrityError), _raw(sql_url) as conn:
        conn.execute(sa.text("UPDATE tasks SET state = 'paused' WHERE task_id = 't1'"))


def test_a_round_number_committed_behind_the_stores_back_is_not_committed_again(
    sql_url: str, committed_twice_setup: tuple[SqlStore, RoundRecord, RoundRecord]
) -> None:
    """Attempt 1 is forced (by another writer of the database) back to AGGREGATING next to
    the committed attempt 2: the store checks the database, not its own past calls, and
    refuses to commit the round number again."""
    store, failed, _ = committed_twice_setup
    with _raw(sql_url) as conn:
        conn.execute(
            sa.text(
                "UPDATE rounds SET state = 'aggregating', ended_at = NULL WHERE round_id = :id"
            ),
            {"id": failed.round_id},
        )
    before = snapshot(store, "t1")

    with pytest.raises(Conflict):
        store.commit_round(failed.round_id, version("t1", 2, 1), {"loss": 1.0}, T0 + 99)

    assert snapshot(store, "t1") == before
    with pytest.raises(NotFound):
        store.get_model_version("t1", 2)


def test_a_database_failure_after_the_first_write_of_a_commit_leaves_no_trace(
    sql_url: str,
) -> None:
    store = SqlStore(sql_url)
    new_task(store, "t1")
    rnd = open_in(store, "t1", AGGREGATING)
    before = snapshot(store, "t1")

    def fail_the_task_update(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TASKS"):
            raise sa.exc.OperationalError(statement, None, OSError("disk I/O error"))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", fail_the_task_update)
    try:
        with pytest.raises(StorageError):
            store.commit_round(rnd.round_id, version("t1", 1), {"loss": 1.0}, T0 + 50)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", fail_the_task_update)

    assert snapshot(store, "t1") == before
    store.close()


def test_sql_store_refuses_a_database_of_a_newer_schema_without_touching_it(
    sql_url: str,
) -> None:
    SqlStore(sql_url).close()
    with _raw(sql_url) as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = 3"))

    with pytest.raises(StorageError, match=r"schema version 3.*version 2"):
        SqlStore(sql_url)

    with _raw(sql_url) as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalar() == 3


def test_sql_store_opens_a_database_of_its_own_schema_version(sql_url: str) -> None:
    SqlStore(sql_url).close()
    SqlStore(sql_url).close()

    with _raw(sql_url) as conn:
        assert conn.execute(sa.text("SELECT version FROM schema_version")).scalars().all() == [2]


def _make_version_1(url: str) -> None:
    """Turns a fresh database into what fedcoord wrote at schema version 1: the tasks'
    state check without ``budget_exhausted``."""
    old_states = ", ".join(repr(s.value) for s in TaskState
                           if s is not TaskState.BUDGET_EXHAUSTED)
    with _raw(url) as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = 1"))
        if conn.dialect.name == "sqlite":
            # Loosening or tightening a CHECK is the one edit SQLite documents for
            # writable_schema (the rows' format does not change).
            conn.exec_driver_sql("PRAGMA writable_schema=ON")
            conn.execute(sa.text("UPDATE sqlite_master SET sql = replace(sql, "
                                 ":new, :old) WHERE name = 'tasks'"),
                         {"new": f"IN ({old_states}, 'budget_exhausted')",
                          "old": f"IN ({old_states})"})
            conn.exec_driver_sql("PRAGMA writable_schema=OFF")
        else:
            conn.execute(sa.text("ALTER TABLE tasks DROP CONSTRAINT ck_tasks_state"))
            conn.execute(sa.text(f"ALTER TABLE tasks ADD CONSTRAINT ck_tasks_state "
                                 f"CHECK (state IN ({old_states}))"))


def test_sql_store_migrates_a_version_1_database_and_keeps_every_row(sql_url: str) -> None:
    store = SqlStore(sql_url)
    new_task(store, "t1")
    rnd = open_in(store, "t1", RoundState.AGGREGATING)
    store.commit_round(rnd.round_id, version("t1", 1, 1), {"loss": 0.5}, T0 + 50)
    before = snapshot(store, "t1")
    store.close()
    _make_version_1(sql_url)
    with pytest.raises(sa.exc.IntegrityError), _raw(sql_url) as conn:
        conn.execute(sa.text("UPDATE tasks SET state = 'budget_exhausted'"))

    store = SqlStore(sql_url)
    assert snapshot(store, "t1") == before
    store.set_task_state("t1", TaskState.BUDGET_EXHAUSTED, "epsilon 8.1 > 8")
    assert store.get_task("t1").state is TaskState.BUDGET_EXHAUSTED
    store.close()
    SqlStore(sql_url).close()  # opening a migrated database again changes nothing
    with _raw(sql_url) as conn:
        versions = conn.execute(sa.text("SELECT version FROM schema_version ORDER BY 1"))
        assert versions.scalars().all() == [1, 2]
    with pytest.raises(sa.exc.IntegrityError), _raw(sql_url) as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.execute(sa.text("UPDATE model_versions SET task_id = 'nobody'"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("not a url", "not a url"),
        ("nosuchdialect://host/db", "nosuchdialect://host/db"),
        ("postgresql+nosuchdriver://u:pw@host/db", "postgresql+nosuchdriver://u:***@host/db"),
        ("postgresql://u:secret@127.0.0.1:1/db", "postgresql://u:***@127.0.0.1:1/db"),
    ],
)
def test_a_bad_url_is_a_storage_error_naming_it_without_its_password(
    url: str, shown: str
) -> None:
    with pytest.raises(StorageError) as refused:
        SqlStore(url)

    message = str(refused.value)
    assert shown in message
    assert "secret" not in message and ":pw@" not in message
    assert len(message) > len(f"cannot open database {shown}: ")  # and the reason


def test_an_unwritable_sqlite_directory_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    with pytest.raises(StorageError, match="cannot open database"):
        SqlStore(f"sqlite:///{blocker / 'sub' / 'coordinator.db'}")


def test_sql_store_serializes_concurrent_callers(sql_url: str) -> None:
    """Many threads race to open the same task's round and to report into it: exactly one
    round opens, and every report is counted once."""
    store = SqlStore(sql_url)
    new_task(store, "t1")
    n = 8
    barrier = threading.Barrier(n)
    opened: list[RoundRecord] = []
    refused: list[Exception] = []

    def open_one() -> None:
        barrier.wait()
        try:
            opened.append(store.open_round("t1", 1, 3, T0, T0 + 60))
        except Conflict as exc:
            refused.append(exc)

    _run_threads(open_one, n)
    assert (len(opened), len(refused)) == (1, n - 1)

    rid = opened[0].round_id
    store.add_participants(rid, [(f"d{i}", "h") for i in range(n)], T0)
    store.set_round_state(rid, TRAINING, now=T0)
    devices = iter(range(n))
    lock = threading.Lock()

    def report() -> None:
        with lock:
            i = next(devices)
        barrier.wait()
        store.set_participant_state(rid, f"d{i}", ParticipantState.REPORTED, now=T0)

    _run_threads(report, n)
    assert store.get_round(rid).reports == n
    store.close()


def _run_threads(target: Callable[[], None], n: int) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]


class _raw:
    """A connection of our own to the store's database, bypassing the store; commits on exit
    unless the block raised."""

    def __init__(self, url: str) -> None:
        self._engine = _engine(url)

    def __enter__(self) -> sa.Connection:
        self._cm = self._engine.begin()
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            self._cm.__exit__(*exc)
        finally:
            self._engine.dispose()


def test_a_failed_sqlite_migration_is_a_storage_error_and_changes_nothing(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    store = SqlStore(url)
    new_task(store, "t1")
    before = snapshot(store, "t1")
    store.close()
    _make_version_1(url)
    with _raw(url) as conn:  # a leftover of an interrupted rebuild blocks this one
        conn.execute(sa.text("CREATE TABLE tasks_new (x INTEGER)"))

    with pytest.raises(StorageError, match=r"cannot migrate .* schema version 2.*tasks_new"):
        SqlStore(url)

    with _raw(url) as conn:
        assert conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar() == 1
        conn.execute(sa.text("DROP TABLE tasks_new"))
    store = SqlStore(url)  # once the obstacle is gone, the migration goes through
    assert snapshot(store, "t1") == before
    store.close()
