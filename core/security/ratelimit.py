"""Token buckets, one per key, with a bound on how many keys are remembered.

Pure: the caller passes the time, so tests need no sleeping.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    """``per_second`` tokens flow in, up to ``burst``; one request takes one."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_second <= 0 or self.burst < 1:
            raise ValueError(f"a rate needs per_second > 0 and burst >= 1, got {self}")


class RateLimiter:
    """Buckets keyed by any string (a device key, a peer address). The least recently used
    buckets beyond ``max_keys`` are forgotten (a forgotten key starts with a full bucket: a
    flood of new keys cannot grow memory, and the peer limit still bounds it)."""

    def __init__(self, rate: Rate, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """Takes one token for ``key``: 0.0 when allowed, else the seconds until one is
        available (nothing taken)."""
        tokens, last = self._buckets.pop(key, (self.rate.burst, now))
        tokens = min(self.rate.burst, tokens + max(0.0, now - last) * self.rate.per_second)
        if tokens >= 1.0:
            wait, tokens = 0.0, tokens - 1.0
        else:
            wait = (1.0 - tokens) / self.rate.per_second
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
