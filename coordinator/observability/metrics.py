"""Prometheus metrics of one coordinator, on a registry of its own (never the process-wide
default one: two coordinators in one process, as in tests, must not share counters).

Three sources, each reading what only it sees:

* :class:`PrometheusSink`, an :class:`~coordinator.observability.events.EventSink`: counters
  and histograms of the device and round transitions, updated as events are published;
* :class:`TimedStore`, around the service's store: how long each store call takes;
* :class:`TaskCollector`, read at scrape time: tasks by state, epsilon spent per task, and
  the event hub's sink failures.

Labels are bounded: ``task`` (task ids, created by operators), ``reason`` (a fixed set per
metric, anything else is ``other``), ``outcome``, ``state``, ``op`` (store method names).
No metric or label ever carries a device id: the sink keeps device ids only in memory, to
count the distinct devices seen recently.

Every name starts with ``fedcoord_``:

==========================================  =========================================
``fedcoord_checkins_total``                 task, outcome (accepted, retry_later, ...)
``fedcoord_devices_told_to_come_back_total``  task
``fedcoord_devices_selected_total``         task (admissions to a round)
``fedcoord_reports_accepted_total``         task
``fedcoord_uploads_rejected_total``         task, reason (REJECTION_REASONS)
``fedcoord_late_total``                     task (updates after their round)
``fedcoord_devices_dropped_total``          task
``fedcoord_rounds_opened_total``            task
``fedcoord_rounds_committed_total``         task
``fedcoord_rounds_failed_total``            task
``fedcoord_budget_exhausted_total``         task
``fedcoord_tasks_created_total``            (none)
``fedcoord_tasks_ended_total``              reason (the final task state)
``fedcoord_secagg_dropped_total``           task (SecAgg dropouts of committed rounds)
``fedcoord_round_duration_seconds``         outcome (committed, failed): histogram
``fedcoord_commit_seconds``                 (none): release to recorded commit, histogram
``fedcoord_bytes_received_total``           (none): update bytes devices uploaded
``fedcoord_bytes_sent_total``               (none): model bytes devices downloaded
``fedcoord_active_devices``                 (none): distinct devices that checked in within
                                            ``active_window_s``
``fedcoord_store_call_seconds``             op: histogram
``fedcoord_tasks``                          state: gauge, at scrape time
``fedcoord_epsilon_spent``                  task: gauge, at scrape time (DP tasks)
``fedcoord_epsilon_budget``                 task: gauge, at scrape time (DP tasks)
``fedcoord_event_sink_failures_total``      (none): at scrape time
``fedcoord_event_sink_events_total``        sink (kafka, store), outcome (queued, sent,
                                            dropped, failed; store: lost): at scrape time
``fedcoord_event_sink_pending``             sink: gauge, events held, at scrape time
==========================================  =========================================
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.observability.events import REJECTION_REASONS, Event, EventHub, EventKind
from coordinator.storage.base import Store
from coordinator.storage.errors import NotFound
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    ParticipantWrite,
    RoundRecord,
    TaskRecord,
)
from core.protocol import CheckInOutcome
from core.types import ParticipantState, RoundState, TaskState

if TYPE_CHECKING:
    from coordinator.rounds.service import CoordinatorService

#: Round durations (open to commit or failure), seconds.
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Store calls, seconds (SQLite with synchronous=FULL fsyncs every write).
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_CHECKIN_OUTCOMES = frozenset(o.value for o in CheckInOutcome)
_TASK_STATES = frozenset(s.value for s in TaskState)
_REJECTION_REASONS = frozenset(REJECTION_REASONS)


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else "other"


class PrometheusSink:
    """Counts events into ``registry``. Thread-safe (prometheus_client's metrics are; the
    recent-devices map has its own lock). ``now``: the coordinator's clock, read when
    :data:`fedcoord_active_devices` is scraped; ``active_window_s``: how recent a check-in
    counts as active."""

    def __init__(self, registry: CollectorRegistry, *, now: Callable[[], float],
                 active_window_s: float = 300.0) -> None:
        self._now = now
        self.active_window_s = active_window_s
        #: device id -> its last check-in (coordinator time); pruned as it is read.
        self._seen: dict[str, float] = {}
        self._seen_lock = threading.Lock()

        def counter(name: str, doc: str, labels: Sequence[str] = ("task",)) -> Counter:
            return Counter(f"fedcoord_{name}", doc, labels, registry=registry)

        self.checkins = counter("checkins", "Device check-ins that named a task, by answer",
                                ("task", "outcome"))
        self.come_back = counter("devices_told_to_come_back",
                                 "Check-ins answered 'retry later' (window open, no free seat)")
        self.selected = counter("devices_selected", "Devices admitted to a round")
        self.accepted = counter("reports_accepted", "Updates accepted into a round")
        self.rejected = counter("uploads_rejected", "Updates or SecAgg messages refused, by reason",
                                ("task", "reason"))
        self.late = counter("late", "Updates that came after their round (or too stale)")
        self.dropped = counter("devices_dropped",
                               "Selected devices that will not report (errored, declined, expired)")
        self.rounds_opened = counter("rounds_opened", "Round attempts opened")
        self.rounds_committed = counter("rounds_committed", "Rounds committed")
        self.rounds_failed = counter("rounds_failed", "Round attempts failed")
        self.budget_exhausted = counter("budget_exhausted",
                                        "Tasks stopped because their privacy budget was spent")
        self.tasks_created = counter("tasks_created", "Tasks created", ())
        self.tasks_ended = counter("tasks_ended", "Tasks that reached a final state, by state",
                                   ("reason",))
        self.secagg_dropped = counter("secagg_dropped",
                                      "Secure-aggregation dropouts in committed rounds")
        self.round_seconds = Histogram(
            "fedcoord_round_duration_seconds",
            "Round attempts from opening to commit or failure (coordinator clock)",
            ("outcome",), buckets=ROUND_BUCKETS, registry=registry)
        self.commit_seconds = Histogram(
            "fedcoord_commit_seconds",
            "Committed rounds from the aggregate's release to the recorded commit (server "
            "optimizer, model file, server-side evaluation)", buckets=ROUND_BUCKETS,
            registry=registry)
        Gauge("fedcoord_active_devices",
              f"Distinct devices that checked in within the last {active_window_s:g} s",
              registry=registry).set_function(self.active_devices)

    def publish(self, event: Event) -> None:
        task = event.task_id
        kind = event.kind
        if kind is EventKind.DEVICE_CHECKED_IN or kind is EventKind.DEVICE_TOLD_TO_COME_BACK:
            # A check-in is one event, of either kind (its answer).
            if kind is EventKind.DEVICE_TOLD_TO_COME_BACK:
                self.come_back.labels(task).inc()
                outcome = CheckInOutcome.RETRY_LATER.value
            else:
                outcome = _bounded(event.reason, _CHECKIN_OUTCOMES)
            self.checkins.labels(task, outcome).inc()
            if event.device_id:
                with self._seen_lock:
                    self._seen[event.device_id] = event.at
        elif kind is EventKind.DEVICE_SELECTED:
            self.selected.labels(task).inc()
        elif kind is EventKind.UPLOAD_ACCEPTED:
            self.accepted.labels(task).inc()
        elif kind is EventKind.UPLOAD_REJECTED:
            self.rejected.labels(task, _bounded(event.reason, _REJECTION_REASONS)).inc()
        elif kind is EventKind.DEVICE_LATE:
            self.late.labels(task).inc()
        elif kind is EventKind.DEVICE_DROPPED:
            self.dropped.labels(task).inc()
        elif kind is EventKind.ROUND_OPENED:
            self.rounds_opened.labels(task).inc()
        elif kind is EventKind.ROUND_COMMITTED:
            self.rounds_committed.labels(task).inc()
            self._round_ended("committed", event.values)
            dropped = event.values.get("secagg_dropped")
            if dropped:
                self.secagg_dropped.labels(task).inc(dropped)
        elif kind is EventKind.ROUND_FAILED:
            self.rounds_failed.labels(task).inc()
            self._round_ended("failed", event.values)
        elif kind is EventKind.BUDGET_EXHAUSTED:
            self.budget_exhausted.labels(task).inc()
            self.tasks_ended.labels(TaskState.BUDGET_EXHAUSTED.value).inc()
        elif kind is EventKind.TASK_ENDED:
            self.tasks_ended.labels(_bounded(event.reason, _TASK_STATES)).inc()
        elif kind is EventKind.TASK_CREATED:
            self.tasks_created.inc()

    def _round_ended(self, outcome: str, values: Mapping[str, float]) -> None:
        seconds = values.get("seconds")
        if seconds is not None and seconds >= 0:
            self.round_seconds.labels(outcome).observe(seconds)
        commit = values.get("commit_seconds")
        if commit is not None and commit >= 0:
            self.commit_seconds.observe(commit)

    def active_devices(self) -> int:
        """Distinct devices whose last check-in is at most ``active_window_s`` old; forgets
        the older ones (so memory is bounded by the devices active in one window)."""
        horizon = self._now() - self.active_window_s
        with self._seen_lock:
            self._seen = {d: at for d, at in self._seen.items() if at >= horizon}
            return len(self._seen)

    def close(self) -> None:
        pass


class TaskCollector(Collector):
    """What is read at scrape time: tasks by state, epsilon spent and budget of each DP task,
    the hub's sink failures. Call only from the coordinator's event loop (it reads the
    service, which is not thread-safe): the HTTP side serves ``/metrics`` there.

    Cost per scrape: one list of the tasks' records, plus one task view (its accountant's
    epsilon) per unfinished DP task; a finished task's epsilon is read once and kept."""

    def __init__(self, service: CoordinatorService, store: Store, events: EventHub) -> None:
        self._service = service
        self._store = store
        self._events = events
        #: What will not change: finished DP tasks' (epsilon, budget), and None for tasks
        #: without DP.
        self._final: dict[str, tuple[float, float] | None] = {}

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: its task labels are not known before a scrape

    def collect(self) -> Iterator[Metric]:
        states = {s.value: 0 for s in TaskState}
        spent = GaugeMetricFamily("fedcoord_epsilon_spent",
                                  "Epsilon spent by a DP task (at its delta)", labels=["task"])
        budget = GaugeMetricFamily("fedcoord_epsilon_budget", "A DP task's epsilon budget",
                                   labels=["task"])
        for record in self._store.list_tasks():
            states[record.state.value] += 1
            privacy = self._privacy(record)
            if privacy is not None:
                spent.add_metric([record.task_id], privacy[0])
                budget.add_metric([record.task_id], privacy[1])
        tasks = GaugeMetricFamily("fedcoord_tasks", "Tasks by state", labels=["state"])
        for state, count in states.items():
            tasks.add_metric([state], count)
        yield tasks
        yield spent
        yield budget
        yield CounterMetricFamily("fedcoord_event_sink_failures",
                                  "Event sink publishes that raised (the round went on)",
                                  value=self._events.sink_failures)
        events = CounterMetricFamily(
            "fedcoord_event_sink_events",
            "What became of the events each sink was given (kafka: queued, sent, dropped, "
            "failed; store: lost)", labels=["sink", "outcome"])
        pending = GaugeMetricFamily("fedcoord_event_sink_pending",
                                    "Events a sink holds, not yet delivered", labels=["sink"])
        for sink in self._events.sinks:
            counts = getattr(sink, "counts", None)
            name = getattr(sink, "name", None)
            if counts is None or not isinstance(name, str):
                continue
            for outcome, value in counts().items():
                if outcome == "pending":
                    pending.add_metric([name], value)
                else:
                    events.add_metric([name, outcome], value)
        yield events
        yield pending

    def _privacy(self, record: TaskRecord) -> tuple[float, float] | None:
        if record.task_id in self._final:
            return self._final[record.task_id]
        try:
            status = self._service.get_task(record.task_id).privacy
        except NotFound:
            return None
        value = (status.epsilon, status.budget) if status is not None else None
        # A task's privacy setting never changes: one without DP needs no status again.
        if record.state.is_final or value is None:
            self._final[record.task_id] = value
        return value


class TimedStore(Store):
    """Delegates to ``inner`` and observes each call's wall time into
    ``fedcoord_store_call_seconds{op}`` (op: the method's name), failed calls included.
    What it measures: the call as the round logic sees it (session, transaction, the
    database's commit and fsync), on the caller's thread. Cost: two ``perf_counter`` reads
    and one histogram observation per call. Thread-safety: that of ``inner``."""

    def __init__(self, inner: Store, registry: CollectorRegistry) -> None:
        self.inner = inner
        self._seconds = Histogram("fedcoord_store_call_seconds",
                                  "Wall time of the round store's calls", ("op",),
                                  buckets=STORE_BUCKETS, registry=registry)

    @contextlib.contextmanager
    def _timed(self, op: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._seconds.labels(op).observe(time.perf_counter() - started)

    def create_task(self, task_id: str, spec_json: str, initial_version: ModelVersionRecord,
                    now: float) -> TaskRecord:
        with self._timed("create_task"):
            return self.inner.create_task(task_id, spec_json, initial_version, now)

    def get_task(self, task_id: str) -> TaskRecord:
        with self._timed("get_task"):
            return self.inner.get_task(task_id)

    def list_tasks(self) -> list[TaskRecord]:
        with self._timed("list_tasks"):
            return self.inner.list_tasks()

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        with self._timed("set_task_state"):
            return self.inner.set_task_state(task_id, state, reason)

    def open_round(self, task_id: str, round_number: int, goal: int, started_at: float,
                   deadline: float) -> RoundRecord:
        with self._timed("open_round"):
            return self.inner.open_round(task_id, round_number, goal, started_at, deadline)

    def get_round(self, round_id: int) -> RoundRecord:
        with self._timed("get_round"):
            return self.inner.get_round(round_id)

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        with self._timed("list_rounds"):
            return self.inner.list_rounds(task_id)

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        with self._timed("open_round_of"):
            return self.inner.open_round_of(task_id)

    def set_round_state(self, round_id: int, state: RoundState, *, now: float,
                        failure_reason: str = "", deadline: float | None = None) -> RoundRecord:
        with self._timed("set_round_state"):
            return self.inner.set_round_state(round_id, state, now=now,
                                              failure_reason=failure_reason, deadline=deadline)

    def add_participants(self, round_id: int, participants: Sequence[tuple[str, str]],
                         now: float) -> None:
        with self._timed("add_participants"):
            self.inner.add_participants(round_id, participants, now)

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        with self._timed("get_participant"):
            return self.inner.get_participant(round_id, device_id)

    def set_participant_state(self, round_id: int, device_id: str, state: ParticipantState, *,
                              now: float, num_examples: int = 0,
                              metrics: Mapping[str, float] | None = None) -> ParticipantRecord:
        with self._timed("set_participant_state"):
            return self.inner.set_participant_state(round_id, device_id, state, now=now,
                                                    num_examples=num_examples, metrics=metrics)

    def write_participants(self, writes: Sequence[ParticipantWrite]) -> None:
        """A group commit of admissions and reports (op ``write_participants``: one call per
        batch; the batch's size is not observed)."""
        with self._timed("write_participants"):
            self.inner.write_participants(writes)

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        with self._timed("list_participants"):
            return self.inner.list_participants(round_id)

    def commit_round(self, round_id: int, version: ModelVersionRecord,
                     metrics: Mapping[str, float], now: float) -> RoundRecord:
        with self._timed("commit_round"):
            return self.inner.commit_round(round_id, version, metrics, now)

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        with self._timed("update_round_metrics"):
            return self.inner.update_round_metrics(round_id, metrics)

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        with self._timed("get_model_version"):
            return self.inner.get_model_version(task_id, version)

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        with self._timed("latest_model_version"):
            return self.inner.latest_model_version(task_id)

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        with self._timed("list_model_versions"):
            return self.inner.list_model_versions(task_id)

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        with self._timed("fail_open_rounds"):
            return self.inner.fail_open_rounds(reason, now)

    def close(self) -> None:
        self.inner.close()


__all__ = ["PrometheusSink", "TaskCollector", "TimedStore"]


class Transfers(Protocol):
    """What the device transport counts (:class:`~coordinator.transport.device_servicer.
    DeviceServicer`): bytes of update chunks received and of model chunks sent."""

    bytes_received: int
    bytes_sent: int


class TransferCollector(Collector):
    """Bytes up and down, read from the transport's counters at scrape time."""

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("fedcoord_bytes_received",
                                  "Update bytes received from devices (chunks of uploads)",
                                  value=self._transfers.bytes_received)
        yield CounterMetricFamily("fedcoord_bytes_sent",
                                  "Model bytes sent to devices (chunks of downloads)",
                                  value=self._transfers.bytes_sent)
