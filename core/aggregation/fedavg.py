"""FedAvg's weighted mean, computed streaming: memory O(model), not O(model x devices)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StreamingWeightedMean:
    """Running sum of ``weight x update`` in float64, fed chunk by chunk.

    An update is added with any number of :meth:`add_chunk` calls covering its elements,
    then counted with :meth:`finish_update`. Not thread-safe.
    """

    def __init__(self, size: int) -> None:
        self._sum = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._weight = 0.0

    @property
    def size(self) -> int:
        return int(self._sum.size)

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    def add_chunk(self, offset: int, values: np.ndarray, weight: float) -> None:
        end = offset + values.size
        if offset < 0 or end > self._sum.size:
            raise ValueError(f"chunk [{offset}, {end}) outside the update of {self._sum.size}")
        # In place, no temporary of the chunk's size in float64 beyond numpy's own buffer.
        seg = self._sum[offset:end]
        seg += weight * values.astype(np.float64, copy=False)

    def finish_update(self, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"an update's weight must be positive, got {weight}")
        self._count += 1
        self._weight += weight

    def mean(self) -> np.ndarray:
        """The weighted mean as float32; ValueError if no update was finished."""
        if self._count == 0:
            raise ValueError("no update was aggregated")
        return (self._sum / self._weight).astype(np.float32)


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    if len(updates) != len(weights) or not updates:
        raise ValueError("need as many weights as updates, and at least one update")
    acc = StreamingWeightedMean(updates[0].size)
    for u, w in zip(updates, weights, strict=True):
        acc.add_chunk(0, u.ravel(), w)
        acc.finish_update(w)
    return acc.mean().reshape(updates[0].shape)


def is_finite(values: np.ndarray) -> bool:
    return bool(np.isfinite(values).all())
