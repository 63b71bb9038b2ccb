"""The coordinator's event log, :class:`EventLog`: each task's events by sequence number,
kept beside the round store (in its database for a :class:`~coordinator.storage.SqlStore`).

It is an interface of its own, not part of :class:`~coordinator.storage.Store`, so that
what writes events can never reach the store wrapper that emits them
(:class:`~coordinator.observability.observed_store.ObservedStore`): appending an event
cannot emit one. Same rules as the Store: every method is atomic, records are frozen
snapshots. One contract test suite runs against every implementation
(tests/contract/test_event_log_contract.py).
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence

from coordinator.storage.base import Store
from coordinator.storage.errors import Conflict
from coordinator.storage.records import EventRecord

#: The most events :meth:`EventLog.list_events` returns by default.
DEFAULT_EVENT_LIMIT = 1000


class EventLog(abc.ABC):
    """Thread-safe: the event sink appends from its writer thread while the admin API
    reads on the event loop."""

    @abc.abstractmethod
    def append_events(self, events: Sequence[EventRecord]) -> None:
        """Stores ``events`` (of any tasks) in one transaction.

        Conflict if one's ``(task_id, seq)`` is already stored or listed twice; then none
        is stored. The log does not check that a task exists (events are history: a task's
        last events may arrive after anything else about it).
        """

    @abc.abstractmethod
    def list_events(self, task_id: str, after_seq: int = 0,
                    limit: int = DEFAULT_EVENT_LIMIT) -> list[EventRecord]:
        """The task's events with ``seq > after_seq``, by seq, at most ``limit`` (>= 1,
        else ValueError); [] for a task without events."""

    @abc.abstractmethod
    def last_event_seq(self, task_id: str) -> int:
        """The highest stored seq of the task; 0 when it has none."""


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


class InMemoryEventLog(EventLog):
    """Events in a dict of lists; lost when the process ends."""

    def __init__(self) -> None:
        self._events: dict[str, dict[int, EventRecord]] = {}
        self._lock = threading.Lock()

    def append_events(self, events: Sequence[EventRecord]) -> None:
        with self._lock:
            seen: set[tuple[str, int]] = set()
            for e in events:
                key = (e.task_id, e.seq)
                if key in seen or e.seq in self._events.get(e.task_id, {}):
                    raise Conflict(f"event {e.seq} of task {e.task_id!r} is already stored")
                seen.add(key)
            for e in events:
                self._events.setdefault(e.task_id, {})[e.seq] = e

    def list_events(self, task_id: str, after_seq: int = 0,
                    limit: int = DEFAULT_EVENT_LIMIT) -> list[EventRecord]:
        check_limit(limit)
        with self._lock:
            by_seq = self._events.get(task_id, {})
            return [by_seq[s] for s in sorted(s for s in by_seq if s > after_seq)[:limit]]

    def last_event_seq(self, task_id: str) -> int:
        with self._lock:
            return max(self._events.get(task_id, {}), default=0)


def open_event_log(store: Store) -> EventLog:
    """The event log beside ``store``: in its database for a
    :class:`~coordinator.storage.SqlStore`, in memory otherwise."""
    from coordinator.storage.sql import SqlStore  # sql imports this module

    if isinstance(store, SqlStore):
        return store.event_log()
    return InMemoryEventLog()
