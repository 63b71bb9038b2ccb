"""FedAvg's weighted mean, computed streaming: memory O(model), not O(model x devices).

The coordinator reads each stored update from disk in chunks and feeds them to one
:class:`StreamingWeightedMean` per round::

    acc = StreamingWeightedMean(num_parameters)
    for update, weight in reports:               # weight: the device's example count
        for offset, chunk in read_chunks(update):
            acc.add_chunk(offset, chunk, weight)
        acc.finish_update(weight)
    mean_delta = acc.mean()
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Elements per block when :meth:`StreamingWeightedMean.mean` divides the sum (8 MB of
#: float64 scratch).
MEAN_BLOCK = 1 << 20


class StreamingWeightedMean:
    """Running ``sum(weight_i * update_i)`` in float64 over flat updates of ``size``
    elements, and the running total of the weights.

    An update is added with :meth:`add_chunk` calls that together cover its elements once,
    then counted with :meth:`finish_update`. The class does not check the coverage: the
    caller has already verified the update's size. Not thread-safe.
    """

    def __init__(self, size: int) -> None:
        """Raises ValueError if ``size`` is negative."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._sum = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._weight = 0.0

    @property
    def size(self) -> int:
        """Elements per update."""
        return int(self._sum.size)

    @property
    def count(self) -> int:
        """Updates finished so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights passed to :meth:`finish_update`."""
        return self._weight

    def add_chunk(self, offset: int, values: np.ndarray, weight: float) -> None:
        """Adds ``weight * values`` (flattened, any float dtype) into elements
        ``[offset, offset + values.size)``. Extra memory: one float64 copy of the chunk.

        Raises:
            ValueError: the chunk reaches outside ``[0, size)``, or ``weight`` is not finite.
        """
        end = offset + values.size
        if offset < 0 or end > self._sum.size:
            raise ValueError(f"chunk [{offset}, {end}) outside the update of {self._sum.size}")
        if not math.isfinite(weight):
            raise ValueError(f"weight must be finite, got {weight}")
        segment = self._sum[offset:end]
        segment += np.multiply(values.reshape(-1), weight, dtype=np.float64)

    def finish_update(self, weight: float) -> None:
        """Counts one update whose chunks have all been added, with its ``weight``.

        Raises:
            ValueError: ``weight`` is not positive and finite.
        """
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"an update's weight must be positive and finite, got {weight}")
        self._count += 1
        self._weight += weight

    def mean(self) -> np.ndarray:
        """``sum / total_weight`` as a new float32 vector of ``size`` elements. Computed a
        block at a time, so the only memory beyond the result is one float64 block (not a
        float64 copy of the whole sum: 800 MB for a 100M-parameter model).

        Raises:
            ValueError: no update was finished.
        """
        if self._count == 0:
            raise ValueError("no update was aggregated")
        out = np.empty(self._sum.size, dtype=np.float32)
        block = np.empty(min(MEAN_BLOCK, self._sum.size), dtype=np.float64)
        for start in range(0, self._sum.size, MEAN_BLOCK):
            part = self._sum[start:start + MEAN_BLOCK]
            scratch = block[:part.size]
            np.divide(part, self._weight, out=scratch)
            out[start:start + part.size] = scratch
        return out


def weighted_mean(updates: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted mean of same-shaped arrays, as float32 of that shape, computed with
    :class:`StreamingWeightedMean` (one chunk per update).

    Raises:
        ValueError: no updates, different numbers of updates and weights, shapes that
            differ, or a weight that is not positive and finite.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need one weight per update and at least one update, got "
                         f"{len(updates)} updates and {len(weights)} weights")
    shape = np.shape(updates[0])
    for i, update in enumerate(updates):
        if np.shape(update) != shape:
            raise ValueError(f"update {i} has shape {np.shape(update)}, update 0 has {shape}")
    accumulator = StreamingWeightedMean(math.prod(shape))
    for update, weight in zip(updates, weights, strict=True):
        accumulator.add_chunk(0, np.asarray(update), weight)
        accumulator.finish_update(weight)
    return accumulator.mean().reshape(shape)


def is_finite(values: np.ndarray) -> bool:
    """True if no element is NaN or infinite (an empty array is finite)."""
    return bool(np.isfinite(values).all())
