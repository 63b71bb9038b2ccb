"""The default event sink: every event into the coordinator's own database
(:class:`~coordinator.storage.event_log.EventLog`), where ``fedctl events`` reads them.

Why a buffer and a writer thread: on SQLite with ``synchronous=FULL`` one event per
transaction cost 9.3 ms (an fsync each), a batch of 256 events 0.15 ms per event (measured on
the development machine's disk, issue 15). ``publish`` runs on the event loop, inside the store
writes of the round path, so it only appends to a buffer (microseconds); a writer thread
writes the buffer every :data:`FLUSH_INTERVAL_S`, or at once when :data:`BATCH_EVENTS` wait.

Guarantees:

* writes go to the event log, never through the store wrapper that emits events
  (:class:`~coordinator.observability.observed_store.ObservedStore`): no recursion;
* batches are written one at a time, in order, each in one transaction: a reader never sees
  a task's seq ``n + 1`` stored without ``n`` (``fedctl events --after N`` misses nothing);
* nothing here raises into the round path: a batch the database refuses (Conflict: its seqs
  are stored already) is dropped, one that fails otherwise is kept and retried; both are
  logged and counted (:attr:`StoreSink.write_failures`, :attr:`StoreSink.events_lost`), as
  are events that arrive while :data:`MAX_BUFFERED` wait;
* :meth:`StoreSink.close` writes what is buffered before it returns.
"""

from __future__ import annotations

import logging
import threading

from coordinator.observability.events import Event, EventKind
from coordinator.storage.errors import Conflict
from coordinator.storage.event_log import DEFAULT_EVENT_LIMIT, EventLog
from coordinator.storage.records import EventRecord

log = logging.getLogger(__name__)

#: Longest an event waits in the buffer, in seconds.
FLUSH_INTERVAL_S = 0.2
#: Events that wake the writer before the interval ends.
BATCH_EVENTS = 256
#: Events buffered while the database is failing; later ones are dropped (and counted).
MAX_BUFFERED = 100_000


def event_to_record(event: Event) -> EventRecord:
    return EventRecord(task_id=event.task_id, seq=event.seq, kind=event.kind.value,
                       at=event.at, round_number=event.round_number, device_id=event.device_id,
                       reason=event.reason, detail=event.detail, values=event.values,
                       schema=event.schema)


def event_from_record(record: EventRecord) -> Event:
    """Raises ValueError for a kind this version does not know (a newer coordinator's)."""
    return Event(kind=EventKind(record.kind), task_id=record.task_id, at=record.at,
                 round_number=record.round_number, device_id=record.device_id,
                 reason=record.reason, detail=record.detail, values=dict(record.values),
                 seq=record.seq, schema=record.schema)


class StoreSink:
    """An :class:`~coordinator.observability.events.EventSink` writing into ``event_log``.
    Thread-safe."""

    def __init__(self, event_log: EventLog, *, flush_interval_s: float = FLUSH_INTERVAL_S,
                 batch_events: int = BATCH_EVENTS, max_buffered: int = MAX_BUFFERED) -> None:
        self._log = event_log
        self._interval_s = flush_interval_s
        self._batch_events = batch_events
        self._max_buffered = max_buffered
        self._buffer: list[EventRecord] = []
        self._buffer_lock = threading.Lock()
        #: Held while a batch is taken and written: batches land one at a time, in order.
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        #: Batches the database did not take (each logged).
        self.write_failures = 0
        #: Events never stored: refused batches, and arrivals over ``max_buffered``.
        self.events_lost = 0
        self._failing = False
        self._writer = threading.Thread(target=self._write_forever, daemon=True,
                                        name="fedcoord-event-writer")
        self._writer.start()

    name = "store"

    def counts(self) -> dict[str, int]:
        """``lost``: events never stored (refused batches, arrivals over ``max_buffered``)."""
        return {"lost": self.events_lost}

    def publish(self, event: Event) -> None:
        record = event_to_record(event)
        with self._buffer_lock:
            if len(self._buffer) >= self._max_buffered:
                self.events_lost += 1
                return
            self._buffer.append(record)
            full = len(self._buffer) >= self._batch_events
        if full:
            self._wake.set()

    def flush(self) -> None:
        """Writes what is buffered now (on the caller's thread); never raises."""
        with self._write_lock:
            with self._buffer_lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return
            try:
                self._log.append_events(batch)
            except Exception as exc:  # noqa: BLE001 - an event never fails a round
                self.write_failures += 1
                if isinstance(exc, Conflict):
                    self.events_lost += len(batch)
                    log.error("event log refused %d events (dropped): %s", len(batch), exc)
                    return
                with self._buffer_lock:  # retried first at the next flush
                    keep = batch[: max(0, self._max_buffered - len(self._buffer))]
                    self.events_lost += len(batch) - len(keep)
                    self._buffer[:0] = keep
                if not self._failing:
                    log.exception("cannot write %d events; retrying every %.1f s",
                                  len(batch), self._interval_s)
                self._failing = True
                return
            if self._failing:
                log.warning("event log writes again")
                self._failing = False

    def list_events(self, task_id: str, after_seq: int = 0,
                    limit: int = DEFAULT_EVENT_LIMIT) -> list[Event]:
        """The task's stored events after ``after_seq``, by seq, including every event
        published before this call (the buffer is written first). Kinds this version does not
        know are left out. Raises StorageError when the log cannot be read, ValueError for a
        ``limit`` below 1."""
        self.flush()
        events = []
        for record in self._log.list_events(task_id, after_seq, limit):
            try:
                events.append(event_from_record(record))
            except ValueError:
                log.warning("event %d of task %s has an unknown kind %r", record.seq,
                            record.task_id, record.kind)
        return events

    def _write_forever(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        """Stops the writer and writes what is buffered."""
        self._closed.set()
        self._wake.set()
        self._writer.join(timeout=10)
        self.flush()


__all__ = ["BATCH_EVENTS", "FLUSH_INTERVAL_S", "MAX_BUFFERED", "StoreSink", "event_from_record",
           "event_to_record"]
