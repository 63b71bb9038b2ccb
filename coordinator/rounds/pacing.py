"""Pace steering (Bonawitz et al., "Towards Federated Learning at Scale: System Design",
SysML 2019, section 2.3): the coordinator spreads its "come back after" answers so that the
check-ins they bring back arrive at about the rate it serves well, whatever the size of the
connected population.

Why: without it, a device told "come back after at most ``retry_after_max_s``" (5 s) returns
within that time, so 10,000 connected devices are 2,000 check-ins a second, more than one
process on two cores answers. The calls then wait in gRPC's queue of calls not yet taken
(where gRPC cancels them after 30 s), and the round's own calls (plans, uploads) wait behind
them (issue 17: p50 12-22 s, p99 30 s at 10,000 devices).

How: a schedule of return slots ``1 / rate_per_s`` apart. Every paced answer takes the next
slot, and the device is told to come back at its slot or at the time its answer asks for
(``earliest``: the round's rules, e.g. "after the round's deadline"), whichever is later.
The first ``rate_per_s * free_s`` answers of a burst keep their ``earliest``: a population
that returns at less than the rate is never delayed (the schedule stays within ``free_s`` of
now), so small deployments and the tests see the rules' answers unchanged. A population of
N devices settles at one check-in each every ~N / rate_per_s seconds: the connected
population over the rate the coordinator serves. No answer waits more than ``max_s`` (the
device agent's longest wait, ``device_agent.runtime.device.MAX_WAIT_S``, 60 s); beyond
``rate_per_s * max_s`` devices the rate grows as N / max_s.

What it does not touch: selection. A device in a selection window is told to come back when
the window closes, unpaced (it may be drawn), and the draw is uniform over the distinct
devices the window saw, as before; pacing only decides how many devices a window sees (about
``rate_per_s * selection_window_s`` once the population is large), which the draw records
(:class:`core.sampling.CohortDraw`) and the DP accountant reads.

Not thread-safe (the service's event loop). Time is passed in.
"""

from __future__ import annotations

import math

__all__ = ["PACE_MAX_S", "CheckInPacer"]

#: The longest wait pacing asks of a device: the device agent waits at most this long
#: before it checks in again, whatever it is told.
PACE_MAX_S = 60.0


class CheckInPacer:
    """Return slots for "come back after" answers, ``1 / rate_per_s`` apart.

    ``rate_per_s``: check-ins per second the answers aim at (0: no pacing, every answer
    keeps its ``earliest``). ``free_s``: how far ahead of now the schedule may run before
    any answer is moved past its ``earliest``. ``max_s``: the longest wait ever asked.
    """

    def __init__(self, rate_per_s: float, *, free_s: float, max_s: float = PACE_MAX_S) -> None:
        if not (rate_per_s >= 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be a finite number >= 0, got {rate_per_s!r}")
        if not (free_s >= 0 and max_s > 0):
            raise ValueError(f"free_s must be >= 0 and max_s > 0, got {free_s!r}, {max_s!r}")
        self.rate_per_s = rate_per_s
        self._interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
        self._free_s = free_s
        self._max_s = max_s
        #: The last slot handed out (seconds since the epoch).
        self._cursor = -math.inf

    def come_back_at(self, now: float, earliest: float) -> float:
        """When a device answered at ``now`` should check in again: ``earliest`` or later,
        never later than ``max(earliest, now + max_s)``. Takes one slot."""
        if self._interval == 0.0:
            return earliest
        slot = max(self._cursor, now) + self._interval
        # Past max_s the slots stop growing: every answer asks for max_s.
        self._cursor = min(slot, now + self._free_s + self._max_s)
        return max(earliest, min(slot - self._free_s, now + self._max_s))

    def ahead_s(self, now: float) -> float:
        """How far the schedule runs ahead of ``now``, past the free part (0: no answer is
        being moved): about the connected population over ``rate_per_s``."""
        return max(0.0, self._cursor - self._free_s - now)
