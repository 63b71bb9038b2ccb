"""What the dashboard shows, as pure functions over events and records: no I/O, no clock.

* :class:`ActivityCounter` folds a task's events into one :class:`RoundActivity` per round
  attempt (the participation funnel and the steps the attempt went through);
  :func:`count_activity` is the same fold over a finished sequence.
* :func:`task_snapshot` joins a task's view, its round records and that activity into one
  :class:`TaskSnapshot`: what the task page renders and what the live feed sends.

What each source is trusted for: the store is the authority on rounds (state, selected,
reports, metrics) and survives a restart; the events add what is never stored (check-ins,
devices told to come back, refusals, late devices) and exist only since this process
started. A funnel count the events never saw is ``None`` (shown as unknown), never 0.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.observability.events import Event, EventKind
from coordinator.rounds.tasks import TaskView
from coordinator.storage.records import RoundRecord
from core.privacy.task import EPSILON_METRIC

ACCURACY_METRIC = "server_eval_accuracy"
LOSS_METRIC = "server_eval_loss"
SECAGG_DROPPED_METRIC = "secagg_dropped"
#: Asynchronous (FedBuff) rounds count the updates that came too stale.
LATE_METRIC = "late"

#: Round attempts kept per task by :class:`ActivityCounter` (the oldest are forgotten).
MAX_ATTEMPTS_PER_TASK = 500

#: (round_number, attempt). Attempt 0: events of a round whose opening this process never
#: saw (it started while the round was open); they belong to that round's latest attempt.
AttemptKey = tuple[int, int]


@dataclass(frozen=True)
class Step:
    """One thing that happened to a round attempt. ``at``: Unix seconds."""

    at: float
    label: str
    detail: str = ""


@dataclass(frozen=True)
class RoundActivity:
    """What the events of one round attempt add up to, in devices: each device counts once
    per column. ``late`` and ``rejected`` count only devices that never reported in the
    attempt (a device that reported and then retried, or called after the commit, is
    refused as duplicate or late: that is a message refused, not a device lost).
    ``refusals``: every refused message, by reason."""

    round_number: int
    attempt: int
    checked_in: int = 0
    told_to_come_back: int = 0
    selected: int = 0
    reported: int = 0
    late: int = 0
    dropped: int = 0
    #: Devices refused (and never reported), by the reason of their last refusal.
    rejected: Mapping[str, int] = field(default_factory=dict)
    refusals: Mapping[str, int] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


#: Attempts per task whose device ids are kept (late refusals of a round arrive after it
#: ended); older attempts keep their counts only.
_ATTEMPTS_WITH_DEVICES = 4


class _Tally:
    """The mutable side of one attempt while events arrive."""

    def __init__(self, round_number: int, attempt: int) -> None:
        self.round_number = round_number
        self.attempt = attempt
        self.checked_in: set[str] = set()
        self.told: set[str] = set()
        self.selected: set[str] = set()
        self.reported: set[str] = set()
        self.late: set[str] = set()
        self.dropped: set[str] = set()
        #: device -> the reason of its last refusal
        self.rejected: dict[str, str] = {}
        self.refusals: dict[str, int] = {}
        self.steps: list[Step] = []
        #: Set once the device ids are dropped.
        self.collapsed: RoundActivity | None = None

    def refused(self, device_id: str, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if self.collapsed is None:
            if reason == "late":
                self.late.add(device_id)
            else:
                self.rejected[device_id] = reason

    def frozen(self) -> RoundActivity:
        if self.collapsed is not None:
            return RoundActivity(**{**self.collapsed.__dict__, "steps": tuple(self.steps),
                                    "refusals": dict(self.refusals)})
        rejected: dict[str, int] = {}
        for device, reason in self.rejected.items():
            if device not in self.reported:
                rejected[reason] = rejected.get(reason, 0) + 1
        return RoundActivity(
            round_number=self.round_number, attempt=self.attempt,
            checked_in=len(self.checked_in), told_to_come_back=len(self.told),
            selected=len(self.selected), reported=len(self.reported),
            late=len(self.late - self.reported), dropped=len(self.dropped),
            rejected=rejected, refusals=dict(self.refusals), steps=tuple(self.steps))

    def collapse(self) -> None:
        if self.collapsed is None:
            self.collapsed = self.frozen()
            self.checked_in, self.told, self.selected, self.reported = set(), set(), set(), set()
            self.late, self.dropped, self.rejected = set(), set(), {}


class _TaskTally:
    def __init__(self) -> None:
        self.attempts: OrderedDict[AttemptKey, _Tally] = OrderedDict()
        #: round_number -> the attempt last opened for it.
        self.latest: dict[int, int] = {}
        #: The attempt open now (check-ins carry no round number).
        self.open: AttemptKey | None = None
        self.seq = 0


class ActivityCounter:
    """Folds events into per-task, per-attempt activity. Not thread-safe (the dashboard's
    feed holds a lock around it). Memory: at most :data:`MAX_ATTEMPTS_PER_TASK` attempts per
    task; device ids for the last few attempts only (older ones keep their counts)."""

    def __init__(self) -> None:
        self._tasks: dict[str, _TaskTally] = {}

    def apply(self, event: Event) -> None:
        task = self._tasks.setdefault(event.task_id, _TaskTally())
        task.seq = max(task.seq, event.seq)
        kind = event.kind
        if kind is EventKind.ROUND_OPENED:
            attempt = int(event.values.get("attempt", 1))
            task.latest[event.round_number] = attempt
            key = (event.round_number, attempt)
            tally = self._tally(task, key)
            tally.steps.append(Step(event.at, "opened", f"goal {int(event.values.get('goal', 0))}"))
            task.open = key
            for old in list(task.attempts.values())[:-_ATTEMPTS_WITH_DEVICES]:
                old.collapse()
            return
        if kind in (EventKind.DEVICE_CHECKED_IN, EventKind.DEVICE_TOLD_TO_COME_BACK) \
                and event.round_number <= 0:
            # A check-in names no round, nor does "come back" in the selection window: the
            # round open now is theirs.
            if task.open is None:
                return
            key = task.open
        elif event.round_number <= 0:
            return
        else:
            key = (event.round_number, task.latest.get(event.round_number, 0))
        tally = self._tally(task, key)
        device = event.device_id
        ids = tally.collapsed is None
        if kind is EventKind.DEVICE_CHECKED_IN:
            if ids:
                tally.checked_in.add(device)
        elif kind is EventKind.DEVICE_TOLD_TO_COME_BACK:  # a check-in, answered "come back"
            if ids:
                tally.checked_in.add(device)
                tally.told.add(device)
        elif kind is EventKind.DEVICE_SELECTED:
            if not tally.selected and ids:
                tally.steps.append(Step(event.at, "first device selected"))
            if ids:
                tally.selected.add(device)
        elif kind is EventKind.UPLOAD_ACCEPTED:
            if ids:
                tally.reported.add(device)
        elif kind is EventKind.DEVICE_DROPPED:
            if ids:
                tally.dropped.add(device)
        elif kind in (EventKind.DEVICE_LATE, EventKind.UPLOAD_REJECTED):
            tally.refused(device, event.reason or "other")
        elif kind is EventKind.ROUND_COMMITTED:
            version = event.values.get("version")
            tally.steps.append(Step(event.at, "committed",
                                    f"model version {int(version)}" if version is not None
                                    else ""))
            if task.open == key:
                task.open = None
        elif kind is EventKind.ROUND_FAILED:
            tally.steps.append(Step(event.at, "failed", event.detail))
            if task.open == key:
                task.open = None

    def _tally(self, task: _TaskTally, key: AttemptKey) -> _Tally:
        tally = task.attempts.get(key)
        if tally is None:
            tally = task.attempts[key] = _Tally(*key)
            while len(task.attempts) > MAX_ATTEMPTS_PER_TASK:
                task.attempts.popitem(last=False)
        return tally

    def activity(self, task_id: str) -> dict[AttemptKey, RoundActivity]:
        task = self._tasks.get(task_id)
        if task is None:
            return {}
        return {key: tally.frozen() for key, tally in task.attempts.items()}

    def last_seq(self, task_id: str) -> int:
        """The highest ``seq`` seen for the task (0: none)."""
        task = self._tasks.get(task_id)
        return task.seq if task is not None else 0


def count_activity(events: Iterable[Event]) -> dict[str, dict[AttemptKey, RoundActivity]]:
    """Every task's activity after ``events`` (in emission order), by task id."""
    counter = ActivityCounter()
    tasks: list[str] = []
    for event in events:
        if event.task_id not in tasks:
            tasks.append(event.task_id)
        counter.apply(event)
    return {task_id: counter.activity(task_id) for task_id in tasks}


# -- snapshots -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Funnel:
    """One attempt's participation. ``selected`` and ``reported`` come from the store;
    the rest from events, ``None`` where this process saw none of the attempt's events."""

    checked_in: int | None
    selected: int
    reported: int
    late: int | None
    rejected: int | None
    dropped: int | None
    told_to_come_back: int | None = None
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    #: Every refused message (devices' retries included), by reason.
    refusals: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptRow:
    """One round attempt as the dashboard shows it."""

    round_number: int
    attempt: int
    state: str
    started_at: float
    ended_at: float | None
    goal: int
    failure_reason: str
    model_version: int | None
    accuracy: float | None
    loss: float | None
    epsilon: float | None
    secagg_dropped: float | None
    funnel: Funnel
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class PrivacyRow:
    epsilon: float
    delta: float
    budget: float
    rounds_accounted: int


@dataclass(frozen=True)
class TaskSnapshot:
    task_id: str
    name: str
    state: str
    #: Why the task is in its state (failed, cancelled); empty otherwise.
    reason: str
    created_at: float
    rounds_planned: int
    rounds_committed: int
    model_version: int
    secure_aggregation: bool
    privacy: PrivacyRow | None
    #: Every attempt, oldest first.
    attempts: tuple[AttemptRow, ...]
    #: The highest event ``seq`` the snapshot includes (0: none seen).
    seq: int = 0

    @property
    def is_final(self) -> bool:
        return self.state != "running"

    @property
    def current(self) -> AttemptRow | None:
        """The attempt still open, if any."""
        return next((a for a in reversed(self.attempts)
                     if a.state not in ("committed", "failed")), None)

    def curve(self, name: str) -> list[tuple[int, float]]:
        """(round number, value) of a metric over the committed attempts, in round order:
        ``accuracy``, ``loss``, ``epsilon`` or ``secagg_dropped``."""
        points: list[tuple[int, float]] = []
        for a in self.attempts:
            value = getattr(a, name)
            if a.state == "committed" and value is not None:
                points.append((a.round_number, float(value)))
        return points

    @property
    def model_versions(self) -> list[tuple[int, int]]:
        """(version, round that produced it; 0 for the initial model), newest first."""
        versions = {0: 0}
        for a in self.attempts:
            if a.model_version is not None:
                versions[a.model_version] = a.round_number
        return sorted(versions.items(), reverse=True)

    def to_json(self) -> dict[str, Any]:
        """The snapshot as JSON-ready data (what the live feed sends besides the HTML)."""
        current = self.current
        return {
            "task_id": self.task_id, "name": self.name, "state": self.state,
            "reason": self.reason, "rounds_planned": self.rounds_planned,
            "rounds_committed": self.rounds_committed, "model_version": self.model_version,
            "current_round": current.round_number if current is not None else None,
            "current_state": current.state if current is not None else None,
            "seq": self.seq,
            "privacy": None if self.privacy is None else {
                "epsilon": self.privacy.epsilon, "delta": self.privacy.delta,
                "budget": self.privacy.budget,
                "rounds_accounted": self.privacy.rounds_accounted},
            "accuracy": self.curve("accuracy"), "loss": self.curve("loss"),
            "epsilon": self.curve("epsilon"), "secagg_dropped": self.curve("secagg_dropped"),
        }


def _metric(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if value is not None else None


def funnel_of(record: RoundRecord, activity: RoundActivity | None) -> Funnel:
    """One attempt's funnel: the store's counts, the events' where it has none."""
    stored_late = _metric(record.metrics, LATE_METRIC)
    if activity is None:
        return Funnel(checked_in=None, selected=record.selected, reported=record.reports,
                      late=int(stored_late) if stored_late is not None else None,
                      rejected=None, dropped=None)
    late = activity.late if stored_late is None else max(activity.late, int(stored_late))
    return Funnel(checked_in=activity.checked_in, selected=record.selected,
                  reported=record.reports, late=late, rejected=activity.rejected_total,
                  dropped=activity.dropped, told_to_come_back=activity.told_to_come_back,
                  rejected_by_reason=dict(activity.rejected), refusals=dict(activity.refusals))


def _stored_steps(record: RoundRecord) -> tuple[Step, ...]:
    steps = [Step(record.started_at, "opened", f"goal {record.goal}")]
    if record.ended_at is not None:
        if record.state.value == "failed":
            steps.append(Step(record.ended_at, "failed", record.failure_reason))
        else:
            version = record.model_version
            steps.append(Step(record.ended_at, record.state.value,
                              f"model version {version}" if version is not None else ""))
    return tuple(steps)


def attempt_row(record: RoundRecord, activity: RoundActivity | None) -> AttemptRow:
    """``activity``: the events of this attempt (None: none seen). Its steps are used when
    it saw the attempt open; else the steps the record implies."""
    steps = (activity.steps if activity is not None and activity.steps
             and activity.steps[0].label == "opened" else _stored_steps(record))
    return AttemptRow(
        round_number=record.round_number, attempt=record.attempt, state=record.state.value,
        started_at=record.started_at, ended_at=record.ended_at, goal=record.goal,
        failure_reason=record.failure_reason, model_version=record.model_version,
        accuracy=_metric(record.metrics, ACCURACY_METRIC),
        loss=_metric(record.metrics, LOSS_METRIC),
        epsilon=_metric(record.metrics, EPSILON_METRIC),
        secagg_dropped=_metric(record.metrics, SECAGG_DROPPED_METRIC),
        funnel=funnel_of(record, activity), steps=steps)


def task_snapshot(view: TaskView, rounds: Sequence[RoundRecord],
                  activity: Mapping[AttemptKey, RoundActivity], *, seq: int = 0
                  ) -> TaskSnapshot:
    """The task page's data. ``activity``: :meth:`ActivityCounter.activity` of the task;
    ``seq``: the last event it includes."""
    latest_attempt: dict[int, int] = {}
    for r in rounds:
        latest_attempt[r.round_number] = max(latest_attempt.get(r.round_number, 0), r.attempt)
    attempts = []
    for r in sorted(rounds, key=lambda r: (r.round_number, r.attempt)):
        found = activity.get((r.round_number, r.attempt))
        if found is None and r.attempt == latest_attempt[r.round_number]:
            found = activity.get((r.round_number, 0))
        attempts.append(attempt_row(r, found))
    privacy = view.privacy
    return TaskSnapshot(
        task_id=view.record.task_id, name=view.spec.name, state=view.record.state.value,
        reason=view.record.reason, created_at=view.record.created_at,
        rounds_planned=view.spec.rounds, rounds_committed=view.record.rounds_committed,
        model_version=view.record.model_version,
        secure_aggregation=view.spec.secure_aggregation is not None,
        privacy=None if privacy is None else PrivacyRow(
            epsilon=privacy.epsilon, delta=privacy.delta, budget=privacy.budget,
            rounds_accounted=privacy.rounds_accounted),
        attempts=tuple(attempts), seq=seq)


__all__ = [
    "ActivityCounter",
    "AttemptKey",
    "AttemptRow",
    "Funnel",
    "PrivacyRow",
    "RoundActivity",
    "Step",
    "TaskSnapshot",
    "attempt_row",
    "count_activity",
    "funnel_of",
    "task_snapshot",
]
