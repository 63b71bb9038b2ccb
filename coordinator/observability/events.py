"""The coordinator's event records and where they go: one :class:`Event` per device or round
transition, handed by one :class:`EventHub` to every sink (the SQL store, Kafka, Prometheus
counters, the dashboard's live feed).

Where events come from (two places, each seeing what only it sees):

* :class:`~coordinator.observability.observed_store.ObservedStore` wraps the store: every
  round, participant and task transition is written there before anything depends on it,
  so an event is emitted only once its write succeeded (round opened / committed / failed,
  devices selected, a report accepted, a device dropped, the budget exhausted, a model
  version created, a task ended);
* :class:`~coordinator.rounds.service.CoordinatorService` emits what is never stored: a
  check-in and its answer (told to come back), and an upload refused, with its reason.

Sinks must return at once and never raise into the round path: a sink that does is logged and
counted (:attr:`EventHub.sink_failures`), and the round goes on. A sink that delivers
elsewhere (Kafka) buffers in a bounded queue of its own and counts what overflows.

Events carry the device id (operators' pipelines join on it); metrics labels never do.
``reason`` is a short category from a bounded set (:data:`REJECTION_REASONS`), fit for a
metrics label; ``detail`` is the human message.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from coordinator.rounds import errors

log = logging.getLogger(__name__)

#: Version of the event record's layout; consumers check it before reading fields.
EVENT_SCHEMA_VERSION = 1


class EventKind(enum.Enum):
    TASK_CREATED = "task_created"
    #: The task reached a final state (completed, failed, cancelled); ``reason`` says which.
    TASK_ENDED = "task_ended"
    BUDGET_EXHAUSTED = "budget_exhausted"
    ROUND_OPENED = "round_opened"
    ROUND_COMMITTED = "round_committed"
    ROUND_FAILED = "round_failed"
    MODEL_VERSION_CREATED = "model_version_created"
    #: Every check-in is one event, whose kind is its answer: this one, unless the device was
    #: told to come back (``reason``: the answer, ``accepted``, ``no_task`` or ``finished``;
    #: an admission follows as DEVICE_SELECTED). Devices that checked in = DEVICE_CHECKED_IN +
    #: DEVICE_TOLD_TO_COME_BACK.
    DEVICE_CHECKED_IN = "device_checked_in"
    DEVICE_SELECTED = "device_selected"
    #: A check-in answered "retry later" (selection window open, no free seat, round in
    #: progress): ``reason`` ``retry_later``, ``values["retry_after_s"]`` the wait asked for.
    DEVICE_TOLD_TO_COME_BACK = "device_told_to_come_back"
    UPLOAD_ACCEPTED = "upload_accepted"
    #: An update or SecAgg message refused; ``reason`` is its category.
    UPLOAD_REJECTED = "upload_rejected"
    #: An update that came after its round (or, asynchronous, was too stale).
    DEVICE_LATE = "device_late"
    #: A selected device that will not report: it errored, declined, or its seat expired.
    DEVICE_DROPPED = "device_dropped"


#: The categories ``reason`` takes for UPLOAD_REJECTED, one per refusal the devices' calls
#: raise (:mod:`coordinator.rounds.errors`).
REJECTION_REASONS = ("invalid", "not_found", "not_selected", "duplicate", "too_large", "late",
                     "data_mismatch", "unavailable", "other")


@dataclass(frozen=True)
class Event:
    """One transition. ``at``: Unix seconds (the coordinator's clock). ``seq``: its place in
    the task's event sequence, assigned by the hub (1, 2, ...; per task, in emission
    order)."""

    kind: EventKind
    task_id: str
    at: float
    round_number: int = 0
    device_id: str = ""
    reason: str = ""
    detail: str = ""
    values: Mapping[str, float] = field(default_factory=dict)
    seq: int = 0
    schema: int = EVENT_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data (kind by its value)."""
        return {
            "schema": self.schema, "seq": self.seq, "kind": self.kind.value,
            "task_id": self.task_id, "at": self.at, "round_number": self.round_number,
            "device_id": self.device_id, "reason": self.reason, "detail": self.detail,
            "values": dict(self.values),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: an unknown kind or schema, or a field of the wrong type.
        """
        schema = int(data.get("schema", 0))
        if schema != EVENT_SCHEMA_VERSION:
            raise ValueError(f"event schema {schema} is not {EVENT_SCHEMA_VERSION}")
        try:
            return cls(
                kind=EventKind(data["kind"]), task_id=str(data["task_id"]),
                at=float(data["at"]), round_number=int(data.get("round_number", 0)),
                device_id=str(data.get("device_id", "")), reason=str(data.get("reason", "")),
                detail=str(data.get("detail", "")),
                values={str(k): float(v) for k, v in dict(data.get("values", {})).items()},
                seq=int(data.get("seq", 0)), schema=schema)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an event record: {exc}") from None


class EventSink(Protocol):
    """Where events go. ``publish`` is called on the coordinator's event loop (and from the
    commit worker's landing, on the same loop): it must return at once."""

    def publish(self, event: Event) -> None: ...

    def close(self) -> None: ...


class CountingSink(Protocol):
    """A sink that says what became of its events (``/metrics`` exports them as
    ``fedcoord_event_sink_events_total{sink, outcome}``)."""

    #: Short and fixed (a metrics label): ``kafka``, ``store``.
    name: str

    def counts(self) -> Mapping[str, int]:
        """Totals by outcome since the start; each only grows."""
        ...


class EventHub:
    """Numbers each task's events and hands them to every sink. Thread-safe (a lock around
    numbering and fan-out: sinks see each task's events in ``seq`` order)."""

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self._sinks: list[EventSink] = list(sinks)
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()
        #: Publishes that raised (each logged); the event still reached the other sinks.
        self.sink_failures = 0

    def add_sink(self, sink: EventSink) -> None:
        with self._lock:
            self._sinks.append(sink)

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        with self._lock:
            return tuple(self._sinks)

    def resume(self, task_id: str, last_seq: int) -> None:
        """Continues ``task_id``'s numbering after ``last_seq`` (after a restart, from what
        the durable sink holds)."""
        with self._lock:
            self._seq[task_id] = max(self._seq.get(task_id, 0), last_seq)

    def emit(self, kind: EventKind, task_id: str, at: float, *, round_number: int = 0,
             device_id: str = "", reason: str = "", detail: str = "",
             values: Mapping[str, float] | None = None) -> Event:
        """Records one event and hands it to every sink; returns it (with its ``seq``)."""
        with self._lock:
            seq = self._seq.get(task_id, 0) + 1
            self._seq[task_id] = seq
            event = Event(kind, task_id, at, round_number, device_id, reason, detail,
                          dict(values or {}), seq)
            for sink in self._sinks:
                try:
                    sink.publish(event)
                except Exception:  # noqa: BLE001 - a sink never fails a round
                    self.sink_failures += 1
                    log.exception("event sink %s failed on %s", type(sink).__name__,
                                  event.kind.value)
        return event

    def close(self) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:  # noqa: BLE001 - closing the others matters more
                log.exception("closing event sink %s failed", type(sink).__name__)


class MemorySink:
    """Keeps every event in memory (tests, the dashboard's recent history)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass

    def kinds(self, task_id: str | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if task_id is None or e.task_id == task_id]


def rejection_reason(error: BaseException) -> str:
    """The bounded category of a refusal raised by the devices' calls."""
    categories: list[tuple[type[BaseException], str]] = [
        (errors.Late, "late"), (errors.Duplicate, "duplicate"), (errors.TooLarge, "too_large"),
        (errors.NotSelected, "not_selected"), (errors.NotFound, "not_found"),
        (errors.DataMismatch, "data_mismatch"), (errors.Unavailable, "unavailable"),
        (errors.InvalidRequest, "invalid")]
    for cls, name in categories:
        if isinstance(error, cls):
            return name
    return "other"


__all__ = [
    "EVENT_SCHEMA_VERSION",
    "CountingSink",
    "Event",
    "EventHub",
    "EventKind",
    "EventSink",
    "MemorySink",
    "REJECTION_REASONS",
    "rejection_reason",
]
