"""The dashboard's pure functions: activity counted from events, a task's snapshot from its
records. No service, no network, no browser."""

from __future__ import annotations

import json
from collections.abc import Iterator

from coordinator.dashboard.snapshot import (
    MAX_ATTEMPTS_PER_TASK,
    ActivityCounter,
    RoundActivity,
    count_activity,
    task_snapshot,
)
from coordinator.observability.events import Event, EventKind
from coordinator.rounds.tasks import TaskView
from coordinator.storage.records import RoundRecord, TaskRecord
from core.privacy.accounting import Sampling
from core.privacy.task import PrivacyStatus
from core.types import ModelSpec, RoundState, TaskSpec, TaskState

K = EventKind


def events(*specs: tuple[EventKind, int, str] | tuple[EventKind, int, str, dict[str, float]],
           task_id: str = "t1") -> Iterator[Event]:
    """``(kind, round, device[:reason][, values])`` -> numbered events."""
    for seq, spec in enumerate(specs, start=1):
        kind, number, who = spec[0], spec[1], spec[2]
        values = spec[3] if len(spec) > 3 else {}  # type: ignore[misc]
        device, _, reason = who.partition(":")
        yield Event(kind, task_id, at=float(seq), round_number=number, device_id=device,
                    reason=reason, detail="not enough reports" if kind is K.ROUND_FAILED
                    else "", values=values, seq=seq)


ROUND_1_FAILS_THEN_REDONE = list(events(
    (K.ROUND_OPENED, 1, "", {"attempt": 1, "goal": 3}),
    # a check-in is one event: told to come back, or checked in (then selected)
    (K.DEVICE_TOLD_TO_COME_BACK, 0, "a"), (K.DEVICE_TOLD_TO_COME_BACK, 0, "b"),
    (K.DEVICE_CHECKED_IN, 0, "a"), (K.DEVICE_SELECTED, 1, "a"),
    (K.DEVICE_CHECKED_IN, 0, "b"), (K.DEVICE_SELECTED, 1, "b"),
    (K.DEVICE_CHECKED_IN, 0, "x"), (K.DEVICE_SELECTED, 1, "x"),
    (K.UPLOAD_ACCEPTED, 1, "a"), (K.UPLOAD_REJECTED, 1, "x:too_large"),
    # a retried upload of a device that reported: a message refused, not a device lost
    (K.UPLOAD_REJECTED, 1, "a:duplicate"),
    (K.DEVICE_DROPPED, 1, "b"),
    (K.ROUND_FAILED, 1, "", {"attempt": 1}),
    (K.ROUND_OPENED, 1, "", {"attempt": 2, "goal": 3}),
    (K.DEVICE_CHECKED_IN, 0, "c"), (K.DEVICE_SELECTED, 1, "c"),
    (K.DEVICE_CHECKED_IN, 0, "d"), (K.DEVICE_SELECTED, 1, "d"),
    (K.UPLOAD_ACCEPTED, 1, "c"), (K.DEVICE_LATE, 1, "d:late"),
    (K.MODEL_VERSION_CREATED, 1, "", {"version": 1}),
    (K.ROUND_COMMITTED, 1, "", {"version": 1}),
    # after the commit: the device that reported calls again, and is told it is late
    (K.DEVICE_LATE, 1, "c:late"),
))


def test_each_attempt_gets_its_own_funnel_and_check_ins_go_to_the_open_attempt() -> None:
    activity = count_activity(ROUND_1_FAILS_THEN_REDONE)["t1"]
    first, second = activity[(1, 1)], activity[(1, 2)]
    assert (first.checked_in, first.told_to_come_back, first.selected, first.reported,
            first.dropped, first.late) == (3, 2, 3, 1, 1, 0)
    assert (second.checked_in, second.selected, second.reported) == (2, 2, 1)


def test_late_and_rejected_count_devices_that_never_reported() -> None:
    activity = count_activity(ROUND_1_FAILS_THEN_REDONE)["t1"]
    first, second = activity[(1, 1)], activity[(1, 2)]
    assert first.rejected == {"too_large": 1} and first.rejected_total == 1
    assert first.refusals == {"too_large": 1, "duplicate": 1}
    assert second.late == 1, "d came late; c reported, then called after the commit"
    assert second.refusals == {"late": 2}


def test_an_attempt_reads_as_its_steps_with_the_failure_reason() -> None:
    activity = count_activity(ROUND_1_FAILS_THEN_REDONE)["t1"]
    assert [(s.label, s.detail) for s in activity[(1, 1)].steps] == [
        ("opened", "goal 3"), ("first device selected", ""), ("failed", "not enough reports")]
    assert [s.label for s in activity[(1, 2)].steps][-1] == "committed"
    assert activity[(1, 2)].steps[-1].detail == "model version 1"


def test_events_of_a_round_opened_before_this_process_count_as_attempt_zero() -> None:
    later = list(events((K.DEVICE_SELECTED, 4, "a"), (K.UPLOAD_ACCEPTED, 4, "a"),
                        (K.DEVICE_CHECKED_IN, 0, "z"), (K.DEVICE_SELECTED, 4, "a")))
    activity = count_activity(later)["t1"]
    assert list(activity) == [(4, 0)]
    assert (activity[(4, 0)].selected, activity[(4, 0)].reported) == (1, 1)
    assert activity[(4, 0)].checked_in == 0, "no open round known: a check-in is not placed"


def test_tasks_are_counted_apart_and_the_last_seq_is_kept() -> None:
    counter = ActivityCounter()
    for e in events((K.ROUND_OPENED, 1, "", {"attempt": 1}), (K.DEVICE_SELECTED, 1, "a"),
                    task_id="x"):
        counter.apply(e)
    for e in events((K.ROUND_OPENED, 1, "", {"attempt": 1}), task_id="y"):
        counter.apply(e)
    assert counter.activity("x")[(1, 1)].selected == 1
    assert counter.activity("y")[(1, 1)].selected == 0
    assert (counter.last_seq("x"), counter.last_seq("y"), counter.last_seq("z")) == (2, 1, 0)
    assert counter.activity("z") == {}


def test_memory_is_bounded_per_task_and_old_attempts_keep_their_counts() -> None:
    counter = ActivityCounter()
    seq = 0
    for n in range(1, MAX_ATTEMPTS_PER_TASK + 11):
        for kind, device in ((K.ROUND_OPENED, ""), (K.DEVICE_SELECTED, "a"),
                             (K.UPLOAD_ACCEPTED, "a"), (K.ROUND_COMMITTED, "")):
            seq += 1
            counter.apply(Event(kind, "t", float(seq), round_number=n, device_id=device,
                                values={"attempt": 1.0}, seq=seq))
    seq += 1
    counter.apply(Event(K.DEVICE_LATE, "t", float(seq), round_number=11, device_id="b",
                        reason="late", seq=seq))
    kept = counter.activity("t")
    assert len(kept) == MAX_ATTEMPTS_PER_TASK and min(kept) == (11, 1)
    oldest = kept[(11, 1)]
    assert (oldest.selected, oldest.reported, oldest.late) == (1, 1, 0)
    assert oldest.refusals == {"late": 1}, "a collapsed attempt still counts messages"
    assert [s.label for s in oldest.steps] == ["opened", "first device selected", "committed"]


# -- snapshots -----------------------------------------------------------------------------


def record(number: int, attempt: int, state: RoundState, *, version: int | None = None,
           metrics: dict[str, float] | None = None, reason: str = "") -> RoundRecord:
    final = state in (RoundState.COMMITTED, RoundState.FAILED)
    return RoundRecord(round_id=number * 10 + attempt, task_id="t1", round_number=number,
                       attempt=attempt, state=state, goal=3, started_at=100.0 * number,
                       deadline=100.0 * number + 60, ended_at=100.0 * number + 5 if final
                       else None, selected=3, reports=2 if final else 1,
                       failure_reason=reason, model_version=version, metrics=metrics or {})


def view(*, name: str = "digits", state: TaskState = TaskState.RUNNING, committed: int = 1,
         privacy: PrivacyStatus | None = None) -> TaskView:
    spec = TaskSpec(name=name, model=ModelSpec("logistic_regression", {}), rounds=3,
                    clients_per_round=3, min_reports=2)
    rec = TaskRecord(task_id="t1", spec_json="{}", state=state, created_at=1.0,
                     rounds_committed=committed, model_version=committed, reason="")
    return TaskView(rec, spec, None, privacy=privacy)


ROUNDS = [
    record(1, 1, RoundState.FAILED, reason="deadline passed with 1 of the 2 reports needed"),
    record(1, 2, RoundState.COMMITTED, version=1,
           metrics={"server_eval_accuracy": 0.5, "server_eval_loss": 1.5, "dp_epsilon": 0.7,
                    "secagg_dropped": 1.0}),
    record(2, 1, RoundState.TRAINING),
]


def test_a_snapshot_holds_every_attempt_its_curves_and_model_versions() -> None:
    snap = task_snapshot(view(), list(reversed(ROUNDS)), {}, seq=9)
    assert [(a.round_number, a.attempt, a.state) for a in snap.attempts] == [
        (1, 1, "failed"), (1, 2, "committed"), (2, 1, "training")]
    assert snap.attempts[0].failure_reason.startswith("deadline passed")
    assert snap.curve("accuracy") == [(1, 0.5)] and snap.curve("loss") == [(1, 1.5)]
    assert snap.curve("epsilon") == [(1, 0.7)] and snap.curve("secagg_dropped") == [(1, 1.0)]
    assert snap.model_versions == [(1, 1), (0, 0)]
    current = snap.current
    assert current is not None and (current.round_number, current.state) == (2, "training")
    assert not snap.is_final and snap.seq == 9


def test_after_a_restart_the_funnel_has_the_stores_counts_and_unknowns_elsewhere() -> None:
    funnel = task_snapshot(view(), ROUNDS, {}).attempts[1].funnel
    assert (funnel.selected, funnel.reported) == (3, 2)
    assert (funnel.checked_in, funnel.late, funnel.rejected, funnel.dropped) == (
        None, None, None, None)
    # The steps come from the record alone.
    assert [s.label for s in task_snapshot(view(), ROUNDS, {}).attempts[0].steps] == [
        "opened", "failed"]


def test_events_fill_the_funnel_but_the_store_is_the_authority_on_selected_and_reported(
) -> None:
    seen = {(1, 2): RoundActivity(1, 2, checked_in=7, selected=5, reported=4, late=1,
                                  dropped=2, rejected={"invalid": 1},
                                  refusals={"invalid": 1, "duplicate": 3})}
    funnel = task_snapshot(view(), ROUNDS, seen).attempts[1].funnel
    assert (funnel.checked_in, funnel.selected, funnel.reported, funnel.late,
            funnel.dropped, funnel.rejected) == (7, 3, 2, 1, 2, 1)
    assert funnel.rejected_by_reason == {"invalid": 1}
    assert funnel.refusals == {"invalid": 1, "duplicate": 3}


def test_attempt_zero_activity_belongs_to_the_latest_attempt_of_its_round() -> None:
    seen = {(1, 0): RoundActivity(1, 0, checked_in=4)}
    attempts = task_snapshot(view(), ROUNDS, seen).attempts
    assert attempts[0].funnel.checked_in is None and attempts[1].funnel.checked_in == 4


def test_the_snapshot_as_json_has_the_privacy_budget_and_the_curves() -> None:
    status = PrivacyStatus(epsilon=0.7, delta=1e-5, budget=10.0, sampling=Sampling.POISSON,
                           rounds_accounted=1, last_draw=None)
    data = json.loads(json.dumps(task_snapshot(view(privacy=status), ROUNDS, {}).to_json()))
    assert data["privacy"] == {"epsilon": 0.7, "delta": 1e-5, "budget": 10.0,
                               "rounds_accounted": 1}
    assert data["accuracy"] == [[1, 0.5]] and data["current_round"] == 2
    assert data["rounds_committed"] == 1 and data["rounds_planned"] == 3
