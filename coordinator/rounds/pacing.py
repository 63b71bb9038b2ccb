"""Pace steering (Bonawitz et al., "Towards Federated Learning at Scale: System Design",
SysML 2019, section 2.3): the coordinator spreads its "come back after" answers so that the
check-ins they bring back arrive at about the rate it serves well, whatever the size of the
connected population.

Why: without it, a device told "come back after at most ``retry_after_max_s``" (5 s) returns
within that time, so 10,000 connected devices are 2,000 check-ins a second, more than one
process on two cores answers. The calls then wait in gRPC's queue of calls not yet taken
(where gRPC cancels them after 30 s), and the round's own calls (plans, uploads) wait behind
them (issue 17: p50 12-22 s, p99 30 s at 10,000 devices).

How: a calendar of the returns promised, per second over the next ``max_s`` seconds. A
paced answer books the first second at or after the time its rules ask for (``earliest``,
e.g. "after the round's deadline") that holds fewer than ``rate_per_s`` returns, and the
device is told a moment in it (the rules' own time when that second has room, so a
population that returns at less than the rate hears the rules' answers unchanged: small
deployments and the tests see no difference). A population of N devices settles at one
check-in each every ~N / rate_per_s seconds: the connected population over the rate the
coordinator serves. When every second up to ``max_s`` (the device agent's longest wait,
``device_agent.runtime.device.MAX_WAIT_S``, 60 s) is full, the answer is a moment spread
over the last half of that horizon: beyond ``rate_per_s * max_s`` devices the rate grows as
N / max_s, without a herd at ``max_s``.

What it does not touch: selection. A device in a selection window is told to come back when
the window closes, unpaced (it may be drawn), and only its return is booked
(:meth:`CheckInPacer.book`), so the answers after it leave room for it; the draw is uniform
over the distinct devices the window saw, as before. Pacing only decides how many devices a
window sees (about ``rate_per_s * selection_window_s`` once the population is large), which
the draw records (:class:`core.sampling.CohortDraw`) and the DP accountant reads. So a task
with privacy sampling must have a window of at least min(population / rate, ``max_s``), in
which every paced device checks in once: shorter, fixed-size q would rise and Poisson
cohorts fall short, and the launch refuses it (:func:`coordinator.rounds.launch.check_pace`).

Promises are kept (:meth:`CheckInPacer.promise`): a device that ignores its "come back
after" and returns early would otherwise be seen in every selection window while the honest
devices, paced, come back only every ~N / rate seconds (at 10,000 devices a device checking
in at every window start was drawn ~38 times as often as its share: a poisoning or Sybil
attacker's gift). So each device's promised return is remembered for as long as it lies in
the future (at most ``max_s``, the agent's longest wait: it never waits longer, so nothing
later is ever promised); a device back before it, by more than ``EARLY_TOLERANCE_S``, is
:meth:`~CheckInPacer.early`, and the caller answers it to come back at that time, without
offering it to anything. Honest devices (the agent waits what it is told, from the moment
the answer arrived) are never early. The memory is one entry per device told within the
horizon, pruned with the calendar.

Not thread-safe (the service's event loop). Time is passed in.
"""

from __future__ import annotations

import math
import random

__all__ = ["EARLY_TOLERANCE_S", "PACE_MAX_S", "CheckInPacer"]

#: The longest wait pacing asks of a device: the device agent waits at most this long
#: before it checks in again, whatever it is told.
PACE_MAX_S = 60.0

#: A device back this much before its promised return is still on time (the agent's wait
#: starts when the answer arrives, so an honest device is late, never early; this allows for
#: the answer's milliseconds being rounded down and a little clock drift).
EARLY_TOLERANCE_S = 0.5


class CheckInPacer:
    """A calendar of promised returns, at most ``rate_per_s`` per second of it.

    ``rate_per_s``: check-ins per second the answers aim at (0: no pacing, every answer
    keeps its ``earliest``). ``max_s``: the longest wait ever asked. ``rng``: where a
    moment within a booked second comes from (jitter; no CSPRNG needed).
    """

    def __init__(self, rate_per_s: float, *, max_s: float = PACE_MAX_S,
                 rng: random.Random | None = None) -> None:
        if not (rate_per_s >= 0 and math.isfinite(rate_per_s)):
            raise ValueError(f"rate_per_s must be a finite number >= 0, got {rate_per_s!r}")
        if not 1 <= max_s <= PACE_MAX_S:
            raise ValueError(f"max_s must be from 1 to {PACE_MAX_S:g} seconds (the device "
                             f"agent waits no longer), got {max_s!r}")
        self.rate_per_s = rate_per_s
        self._max_s = max_s
        self._rng = rng if rng is not None else random.Random()
        #: Returns booked, by whole second since the epoch.
        self._booked: dict[int, float] = {}
        #: Each device's promised return, while it is in the future (pruned with the seconds).
        self._promised: dict[str, float] = {}
        self._pruned = 0

    def come_back_at(self, now: float, earliest: float) -> float:
        """When a device answered at ``now`` should check in again: ``earliest`` when its
        second has room, else a moment in the first second after it that has; never later
        than ``max(earliest, now + max_s)``. Books that return."""
        if self.rate_per_s <= 0:
            return earliest
        self._prune(now)
        first = math.floor(earliest)
        last = math.floor(now + self._max_s)
        for second in range(first, last + 1):
            if self._booked.get(second, 0.0) < self._room(second):
                self._booked[second] = self._booked.get(second, 0.0) + 1
                if second == first:
                    return earliest
                return min(second + self._rng.random(), now + self._max_s)
        # Every second up to max_s is full: spread over the horizon's last half.
        at = max(earliest, now + self._max_s * self._rng.uniform(0.5, 1.0))
        self._booked[math.floor(at)] = self._booked.get(math.floor(at), 0.0) + 1
        return at

    def book(self, at: float) -> None:
        """Books a return the rules fixed (a selection window's close), room or not."""
        if self.rate_per_s > 0:
            self._booked[math.floor(at)] = self._booked.get(math.floor(at), 0.0) + 1

    def booked(self, now: float, seconds: float) -> float:
        """Returns booked from ``now`` over the next ``seconds``."""
        start = math.floor(now)
        return sum(self._booked.get(s, 0.0) for s in range(start, start + math.ceil(seconds)))

    def promise(self, device_id: str, now: float, at: float) -> None:
        """Remembers that ``device_id``, answered at ``now``, was told to come back at ``at``
        (capped at ``now + max_s``: the agent never waits longer). A later answer replaces
        it. Only while pacing is on: with a rate of 0 nothing is remembered."""
        if self.rate_per_s <= 0:
            return
        self._prune(now)
        at = min(at, now + self._max_s)
        if at > now + EARLY_TOLERANCE_S:
            self._promised[device_id] = at
        else:
            self._promised.pop(device_id, None)

    def forget(self, device_id: str) -> None:
        """Drops ``device_id``'s promise (it was seated: it is answered at once from then)."""
        self._promised.pop(device_id, None)

    def early(self, device_id: str, now: float) -> float | None:
        """The return ``device_id`` was promised, when it is back before it (by more than
        ``EARLY_TOLERANCE_S``); None when it is on time or was promised nothing."""
        at = self._promised.get(device_id)
        if at is None or now >= at - EARLY_TOLERANCE_S:
            return None
        return at

    def promises(self) -> int:
        """Promises remembered (devices told within the horizon, not yet due)."""
        return len(self._promised)

    def _room(self, second: int) -> int:
        """Returns second ``second`` may hold: ``rate_per_s`` on average, exactly, for any
        rate (floor(rate x (s + 1)) - floor(rate x s): 0.5/s is one every other second, 2.5/s
        is 2, 3, 2, 3, ...; a fractional rate is never rounded up)."""
        return math.floor(self.rate_per_s * (second + 1)) - math.floor(self.rate_per_s * second)

    def _prune(self, now: float) -> None:
        """Forgets the seconds gone by and the promises due (every few seconds, not every
        call)."""
        second = math.floor(now)
        if second - self._pruned < 8:
            return
        self._pruned = second
        for old in [s for s in self._booked if s < second]:
            del self._booked[old]
        for device in [d for d, at in self._promised.items() if at < now]:
            del self._promised[device]
