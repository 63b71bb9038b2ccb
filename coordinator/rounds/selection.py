"""Pure selection rules: who is eligible, and a uniform sample of the candidates."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from core.types import DeviceAttributes, Eligibility

T = TypeVar("T")


def is_eligible(attrs: DeviceAttributes, eligibility: Eligibility, population: str) -> bool:
    return (
        attrs.population == population
        and (attrs.charging or not eligibility.require_charging)
        and (attrs.unmetered or not eligibility.require_unmetered)
        and (attrs.idle or not eligibility.require_idle)
    )


def sample_uniform(candidates: Sequence[T], k: int, rng: random.Random) -> list[T]:
    """Up to ``k`` candidates chosen uniformly at random without replacement."""
    if k >= len(candidates):
        return list(candidates)
    return rng.sample(list(candidates), k)
