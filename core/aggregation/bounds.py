"""Bounds on one update's influence and on a model before it is committed (the task's
:class:`core.types.Robustness`), as pure functions over arrays.

Why each bound exists (outside testing, issue 13): a device that claims 2^31 examples
owned the weighted mean (weight share 0.9999999); an update of values near 3e38 made every
later round overflow. With the weight capped, one device's share is at most
``cap / (cap + the others' weights)``; with the norm bounded, the mean of a round moves by at
most ``max_update_l2_norm`` in L2 and stays finite in float32; and a model with a
non-finite or absurd parameter is never committed, whatever path produced it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt


def capped_weight(num_examples: int, *, weight_cap: int) -> int:
    """An update's FedAvg weight: its example count, at most ``weight_cap``.

    Raises:
        ValueError: ``num_examples`` or ``weight_cap`` is below 1.
    """
    if num_examples < 1 or weight_cap < 1:
        raise ValueError(f"num_examples and weight_cap must be at least 1, got {num_examples} "
                         f"and {weight_cap}")
    return min(num_examples, weight_cap)


class StreamingL2Norm:
    """The L2 norm of a vector seen in chunks, accumulated in float64: the squares of float32
    values (at most 1.2e77) cannot overflow, so the norm is finite exactly when every value
    is. Not thread-safe."""

    def __init__(self) -> None:
        self._squares = 0.0

    def add(self, values: npt.NDArray[np.floating]) -> None:
        flat = np.asarray(values).reshape(-1).astype(np.float64, copy=False)
        self._squares += float(np.dot(flat, flat))

    @property
    def norm(self) -> float:
        """The norm so far: NaN or inf when a value was not finite."""
        return math.sqrt(self._squares)


def model_problem(params: Mapping[str, npt.NDArray[np.floating]], *,
                  max_abs_parameter: float) -> str | None:
    """Why ``params`` must not be committed (a non-finite parameter, or one above
    ``max_abs_parameter`` in magnitude), naming the tensor; None when it may be."""
    for name, values in params.items():
        if values.size == 0:
            continue
        if not np.isfinite(values).all():
            return f"tensor {name!r} of the new model holds non-finite values"
        largest = float(np.max(np.abs(values)))
        if largest > max_abs_parameter:
            return (f"tensor {name!r} of the new model holds a parameter of magnitude "
                    f"{largest:.3g}, above robustness.max_abs_parameter "
                    f"({max_abs_parameter:g})")
    return None


__all__ = ["StreamingL2Norm", "capped_weight", "model_problem"]
