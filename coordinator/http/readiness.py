"""What ``/readyz`` answers: whether this coordinator should be sent traffic now.

Ready means both:

* the coordinator is not shutting down (:meth:`Readiness.shutting_down` was not called);
* it leads, when it is one replica of several (a standby serves reads but refuses devices,
  so a load balancer should not send it their traffic; the reason names the leader);
* the round store answered a cheap read (one primary-key lookup) within ``timeout_s``.

The read runs on a worker thread, so a stuck database never stalls the event loop that
serves the devices; only one probe is in flight at a time (a probe still stuck from an
earlier request answers "not ready" at once instead of piling up threads).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.storage.base import Store
from coordinator.storage.errors import NotFound

#: A task id no task has (ids are slugs of the task's name plus a suffix); found or not,
#: the store answered.
_PROBE_TASK_ID = "readyz-probe"


@dataclass(frozen=True)
class Verdict:
    ready: bool
    #: Why not, for a person (empty when ready).
    reason: str = ""


def store_probe(store: Store) -> Callable[[], None]:
    """A cheap read of ``store`` that returns when the store answers and raises when it
    does not. ``store`` must be callable from a worker thread (SqlStore is)."""

    def probe() -> None:
        try:
            store.get_task(_PROBE_TASK_ID)
        except NotFound:
            pass

    return probe


class Readiness:
    """Decides ``/readyz``. Call :meth:`check` on the event loop."""

    def __init__(self, probe: Callable[[], None], *, timeout_s: float = 2.0,
                 standby: Callable[[], str | None] | None = None) -> None:
        """``standby()``: None while this coordinator leads (or has no replicas), else why
        it does not (a replica standing by)."""
        self._probe = probe
        self._standby = standby
        self.timeout_s = timeout_s
        self._stopping = False
        self._in_flight: asyncio.Future[None] | None = None

    def shutting_down(self) -> None:
        """From now on, never ready."""
        self._stopping = True

    async def check(self) -> Verdict:
        if self._stopping:
            return Verdict(False, "shutting down")
        if self._standby is not None and (reason := self._standby()) is not None:
            return Verdict(False, reason)
        if self._in_flight is not None and not self._in_flight.done():
            return Verdict(False, "the store has not answered an earlier probe yet")
        loop = asyncio.get_running_loop()
        self._in_flight = loop.run_in_executor(None, self._probe)
        try:
            await asyncio.wait_for(asyncio.shield(self._in_flight), self.timeout_s)
        except TimeoutError:
            return Verdict(False, f"the store did not answer within {self.timeout_s:g} s")
        except Exception as exc:  # noqa: BLE001 - any failure of the read means not ready
            return Verdict(False, f"the store failed: {type(exc).__name__}: {exc}"[:300])
        if self._stopping:
            return Verdict(False, "shutting down")
        return Verdict(True)
