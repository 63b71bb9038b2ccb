"""Histograms with fixed, declared bins: the mergeable sketch of a distribution that stays a
plain sum (so it can be masked by secure aggregation and noised by central DP, which a
t-digest or KLL sketch cannot: their merge is not a sum). Quantiles are interpolated
linearly inside the bin where the cumulative count crosses them; for exact counts of values
inside [low, high] the error is at most one bin width (the true quantile lies in that bin).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def bin_index(value: float, *, low: float, high: float, bins: int) -> int:
    """The bin of ``value``: equal widths over [low, high]; values outside go to the end bins."""
    if not math.isfinite(value):
        raise ValueError(f"cannot bin a non-finite value {value}")
    j = math.floor((value - low) / (high - low) * bins)
    return min(max(j, 0), bins - 1)


def one_hot(value: float, *, low: float, high: float, bins: int) -> npt.NDArray[np.float64]:
    out = np.zeros(bins, dtype=np.float64)
    out[bin_index(value, low=low, high=high, bins=bins)] = 1.0
    return out


def quantiles(counts: npt.NDArray[np.floating], qs: Sequence[float], *, low: float,
              high: float) -> list[float]:
    """The ``qs`` quantiles (each in [0, 1]) of the distribution the bin ``counts``
    describe, interpolated inside the crossing bin. Negative counts (DP noise) count as 0.
    NaN for each when the total count is not positive.

    Raises:
        ValueError: a q outside [0, 1], or no bins.
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    if c.size == 0:
        raise ValueError("a histogram needs at least one bin")
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles must be in [0, 1], got {list(qs)}")
    total = float(c.sum())
    if total <= 0:
        return [math.nan for _ in qs]
    width = (high - low) / c.size
    cumulative = np.concatenate([[0.0], np.cumsum(c)])
    out = []
    for q in qs:
        target = q * total
        # The first bin whose cumulative count reaches the target (empty bins skipped).
        j = int(np.searchsorted(cumulative[1:], target, side="left"))
        j = min(j, c.size - 1)
        while c[j] == 0 and j + 1 < c.size:
            j += 1
        inside = (target - cumulative[j]) / c[j] if c[j] > 0 else 0.0
        out.append(low + (j + min(max(inside, 0.0), 1.0)) * width)
    return out
