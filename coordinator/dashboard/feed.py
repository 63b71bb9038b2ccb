"""The dashboard's event sink: counts each task's activity and wakes the live streams.

:class:`DashboardFeed` is added to the service's :class:`~coordinator.observability.events.
EventHub`; ``publish`` folds the event into an :class:`~coordinator.dashboard.snapshot.
ActivityCounter` and sets the asyncio events of the streams watching that task. It never
calls the service and never awaits: it returns at once, as the hub requires.

Thread-safety: ``publish`` may be called from any thread (a lock guards the counter; waking
a stream goes through its loop's ``call_soon_threadsafe``); the reads are called on the
dashboard's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from coordinator.dashboard.snapshot import ActivityCounter, AttemptKey, RoundActivity
from coordinator.observability.events import Event


class _Watcher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.changed = asyncio.Event()

    def wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.changed.set)
        except RuntimeError:  # the loop closed: nobody waits any more
            pass


class DashboardFeed:
    """An :class:`~coordinator.observability.events.EventSink` for the dashboard."""

    def __init__(self) -> None:
        self._counter = ActivityCounter()
        self._lock = threading.Lock()
        self._watchers: dict[str, set[_Watcher]] = {}
        #: Set by :meth:`close` (the hub closes its sinks when the coordinator stops): the
        #: live streams end, so an HTTP server waiting for its connections can stop.
        self.closed = False

    def publish(self, event: Event) -> None:
        with self._lock:
            self._counter.apply(event)
            watchers = list(self._watchers.get(event.task_id, ()))
        for w in watchers:
            w.wake()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            watchers = [w for ws in self._watchers.values() for w in ws]
        for w in watchers:
            w.wake()

    def activity(self, task_id: str) -> dict[AttemptKey, RoundActivity]:
        with self._lock:
            return self._counter.activity(task_id)

    def last_seq(self, task_id: str) -> int:
        with self._lock:
            return self._counter.last_seq(task_id)

    @contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        """An asyncio event set whenever ``task_id`` emits (clear it before waiting again);
        call on the loop that will wait on it."""
        watcher = _Watcher(asyncio.get_running_loop())
        with self._lock:
            self._watchers.setdefault(task_id, set()).add(watcher)
        try:
            yield watcher.changed
        finally:
            with self._lock:
                left = self._watchers.get(task_id)
                if left is not None:
                    left.discard(watcher)
                    if not left:
                        del self._watchers[task_id]

    def watching(self, task_id: str) -> int:
        """How many streams watch ``task_id`` now (for tests and metrics)."""
        with self._lock:
            return len(self._watchers.get(task_id, ()))


__all__ = ["DashboardFeed"]
