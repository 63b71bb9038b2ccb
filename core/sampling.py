"""Drawing a round's cohort from the devices that are there, and the record of what was drawn.

The privacy accountant's amplification by sampling holds only for the sampling that really
happened, so the draw and its record live together: whoever samples (the coordinator's
:class:`coordinator.rounds.selection.Selector`, a simulation) returns a :class:`CohortDraw`
and the accountant reads the ``sampling_rate``, ``population`` and ``cohort`` from it, never
from a configured number.

* **fixed size**: ``k`` of the ``n`` distinct eligible devices, uniformly without replacement
  (every k-subset equally likely, whatever the order in which devices arrived). Each
  device's inclusion probability is ``k / n``; the analysis (replace-one, sampled without
  replacement) uses ``n = min(configured population, eligible seen)``: when fewer devices
  were seen than configured, q is computed from what was seen, so it is never smaller than
  the real one.
* **Poisson**: each distinct eligible device independently with probability ``p``; the
  cohort size is random. Devices that were not seen were included with probability 0 < p,
  so ``p`` bounds every device's inclusion whatever the population seen.

Pure; randomness comes from the caller's ``random.Random`` (``SystemRandom`` in production).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.privacy.accounting import Sampling

T = TypeVar("T")
H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True)
class CohortDraw:
    """What one round's selection did, as the accountant needs it.

    ``eligible``: distinct eligible devices seen in the selection window. ``cohort``: how
    many were drawn. ``population``: the n of the fixed-size analysis (the configured
    population, or fewer when fewer were seen). ``sampling_rate``: each device's inclusion
    probability bound (``cohort / population`` for fixed size, ``p`` for Poisson)."""

    kind: Sampling
    eligible: int
    cohort: int
    population: int
    sampling_rate: float


def fixed_size_draw(*, eligible: int, cohort: int, population: int) -> CohortDraw:
    """The record of a uniform draw of ``cohort`` of ``eligible`` distinct devices, for a
    configured ``population``: the analysis uses n = min(population, eligible) (at least
    the cohort), so q = cohort / n is never smaller than the real inclusion probability."""
    n = max(min(population, eligible) if eligible else population, cohort, 1)
    return CohortDraw(Sampling.FIXED_SIZE, eligible, cohort, n, cohort / n)


def sample_uniform(candidates: Sequence[T], k: int, rng: random.Random) -> list[T]:
    """Up to ``k`` candidates chosen uniformly at random without replacement."""
    if k >= len(candidates):
        return list(candidates)
    return rng.sample(list(candidates), k)


class WindowSample(Generic[H]):
    """A uniform sample drawn while candidates arrive, one distinct candidate at a time.

    Fixed size: reservoir sampling (Algorithm R) over distinct candidates, so the kept
    ``k`` are a uniform k-subset of everything offered, whatever the arrival order; memory
    is the set of distinct ids seen (to count them and to ignore repeats) plus the reservoir.
    Poisson: each distinct candidate is kept with probability ``p`` when first seen.
    Not thread-safe.
    """

    def __init__(self, kind: Sampling, *, size: int, rate: float, rng: random.Random) -> None:
        if size < 1:
            raise ValueError(f"a sample needs size >= 1, got {size}")
        if not 0 < rate <= 1:
            raise ValueError(f"the Poisson rate must be in (0, 1], got {rate}")
        self.kind = kind
        self.size = size
        self.rate = rate
        self._rng = rng
        self._seen: set[H] = set()
        self._kept: list[H] = []

    @property
    def seen(self) -> int:
        return len(self._seen)

    def offer(self, candidate: H) -> None:
        """Counts ``candidate`` once (repeats change nothing) and maybe keeps it."""
        if candidate in self._seen:
            return
        self._seen.add(candidate)
        if self.kind is Sampling.POISSON:
            if self._rng.random() < self.rate:
                self._kept.append(candidate)
        elif len(self._kept) < self.size:
            self._kept.append(candidate)
        else:
            j = self._rng.randrange(len(self._seen))
            if j < self.size:
                self._kept[j] = candidate

    def offer_all(self, candidates: Iterable[H]) -> None:
        for c in candidates:
            self.offer(c)

    def draw(self, *, population: int) -> tuple[list[H], CohortDraw]:
        """The kept candidates and the record of the draw; ``population`` is the configured
        population the analysis may use at most (fewer when fewer were seen)."""
        kept = list(self._kept)
        if self.kind is Sampling.POISSON:
            n = max(min(population, self.seen) if self.seen else population, len(kept), 1)
            return kept, CohortDraw(self.kind, self.seen, len(kept), n, self.rate)
        return kept, fixed_size_draw(eligible=self.seen, cohort=len(kept),
                                     population=population)


__all__ = ["CohortDraw", "WindowSample", "fixed_size_draw", "sample_uniform"]
