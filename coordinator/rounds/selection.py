"""Selection: who is eligible, and the one place a round's cohort is chosen.

A :class:`Selector` owns one round attempt's selection window, candidate pool,
over-selection and (outside DP) late admission::

    window open:    every eligible check-in is offered to a uniform sample over the
                    *distinct* devices of the window (no first-come cap, repeats ignored)
    window closes:  the sample is drawn (``target`` devices, fixed size; or each device with
                    probability p, Poisson) and recorded as a :class:`core.sampling.CohortDraw`
    after that:     late admission (first come, while seats are free) only when the task
                    allows it; under differential privacy it never does, because the
                    accountant's analysis covers the uniform draw and nothing else

Under DP, a window that closes with fewer than ``min_cohort`` distinct devices seen stays open
(up to ``last_close``): nobody has been admitted yet, so extending it changes no device's
inclusion probability, only the population the draw is made from.

Not thread-safe (the service's event loop); randomness from the injected ``random.Random``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from core.privacy.accounting import Sampling
from core.sampling import CohortDraw, WindowSample
from core.types import DeviceAttributes, Eligibility

__all__ = ["Admission", "SelectionPolicy", "Selector", "is_eligible"]


def is_eligible(attrs: DeviceAttributes, eligibility: Eligibility, population: str, *,
                device_id: str) -> bool:
    """Whether ``device_id``, reporting ``attrs``, may be offered to the task's selection.

    Eligibility is decided before a device reaches the :class:`Selector`, so it narrows the
    population selection samples from and changes nothing in how it samples: every device
    the window sees is offered to the same uniform draw (fixed size, recorded with the
    eligible devices seen) or kept with the same probability p (Poisson). An ``arm`` filter
    (:class:`core.types.ArmFilter`) is a keyed hash of the device id alone: a fixed
    sub-population, chosen before and independently of any round and of any device's data,
    so the accountant's analysis holds for the task as it does for any population: a device
    outside the arm is included with probability 0, inside it with the analysed q (fixed
    size: q = cohort / min(configured population, eligible seen), and the seen are the arm's
    devices; Poisson: p). It never depends on what a device reports about itself."""
    return (
        attrs.population == population
        and (attrs.charging or not eligibility.require_charging)
        and (attrs.unmetered or not eligibility.require_unmetered)
        and (attrs.idle or not eligibility.require_idle)
        and (eligibility.arm is None or eligibility.arm.admits(device_id))
    )


class Admission(enum.Enum):
    """What a check-in during selection gets."""

    #: Window open: the device is a candidate; it hears the outcome when it checks in again.
    CANDIDATE = "candidate"
    #: Late admission (the window closed, seats are free, and the task allows it).
    ADMIT = "admit"
    #: The cohort is drawn and complete (or late admission is off).
    FULL = "full"


@dataclass(frozen=True)
class SelectionPolicy:
    """How a task's rounds select. ``target``: devices admitted per round (the goal times
    over-selection). ``rate``: Poisson's p. ``population``: the configured population (the
    most the analysis may assume). ``late_admission``: admit first-come after the window
    while seats are free (off under DP). ``min_cohort``: under DP, the window is held open
    until at least this many distinct devices were seen."""

    kind: Sampling
    target: int
    population: int
    late_admission: bool
    min_cohort: int = 0

    @property
    def rate(self) -> float:
        return min(1.0, self.target / self.population)


class Selector:
    """One round attempt's selection."""

    def __init__(self, policy: SelectionPolicy, *, opened: float, window_s: float,
                 last_close: float, rng: random.Random) -> None:
        self.policy = policy
        self.window_s = window_s
        self.window_closes = opened + window_s
        self.last_close = last_close
        self._sample: WindowSample[str] = WindowSample(policy.kind, size=policy.target,
                                                       rate=policy.rate, rng=rng)
        #: The draw made when the window closed; None while it is open.
        self.draw: CohortDraw | None = None

    @property
    def is_open(self) -> bool:
        return self.draw is None

    @property
    def seen(self) -> int:
        return self._sample.seen

    def check_in(self, device_id: str, now: float, seats: int) -> Admission:
        """Offers a device that is not seated yet; ``seats``: devices admitted so far."""
        if self.is_open and now < self.window_closes:
            self._sample.offer(device_id)
            return Admission.CANDIDATE
        if not self.is_open and self.policy.late_admission and seats < self.policy.target:
            return Admission.ADMIT
        return Admission.FULL

    def due(self, now: float) -> bool:
        """Whether the window should close now."""
        return self.is_open and now >= self.window_closes

    def close(self, now: float) -> list[str] | None:
        """Draws the cohort: the devices to admit, or None when the window stays open
        (fewer than ``min_cohort`` devices seen, and it may still be extended)."""
        assert self.is_open
        if self._sample.seen < self.policy.min_cohort and now < self.last_close:
            self.window_closes = min(self.last_close, now + self.window_s)
            return None
        chosen, self.draw = self._sample.draw(population=self.policy.population)
        return chosen
