"""L2 clipping of a whole update: the sensitivity bound of every DP mechanism here.

An update is either one flat array or a mapping of tensor name -> array (a model delta).
The norm is taken over *all* coordinates together, accumulated in float64, so clipping a
dict and clipping its concatenation give the same result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import overload

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]

#: Elements converted to float64 at a time by :func:`l2_norm` (fits in L2 cache).
_BLOCK = 1 << 15


def l2_norm(update: FloatArray | Mapping[str, FloatArray]) -> float:
    """The L2 norm of all coordinates of ``update``, computed in float64."""
    arrays = update.values() if isinstance(update, Mapping) else (update,)
    total = 0.0
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        # float64 accumulation, in blocks: the bound must hold to float64 rounding, and a
        # float32 dot would accumulate in float32.
        for start in range(0, flat.size, _BLOCK):
            block = flat[start:start + _BLOCK].astype(np.float64, copy=False)
            total += float(np.dot(block, block))
    return math.sqrt(total)


@overload
def clip_to_l2_norm(update: FloatArray, *, l2_clip_norm: float) -> tuple[FloatArray, float]: ...


@overload
def clip_to_l2_norm(update: Mapping[str, FloatArray], *, l2_clip_norm: float
                    ) -> tuple[dict[str, FloatArray], float]: ...


def clip_to_l2_norm(update: FloatArray | Mapping[str, FloatArray], *, l2_clip_norm: float
                    ) -> tuple[FloatArray | dict[str, FloatArray], float]:
    """(update scaled to L2 norm at most ``l2_clip_norm``, its original L2 norm).

    An update already within the bound is returned unchanged (copied, same dtypes); a longer
    one is scaled by ``l2_clip_norm / norm``, so its direction is kept. Each array keeps its
    dtype: a float32 result may exceed the bound by float32 rounding (relative 1e-6), which
    the noise calibration's margin absorbs. The input is never modified.

    Raises:
        ValueError: ``l2_clip_norm`` is not positive and finite, or ``update`` holds a
            non-finite value (its norm, hence its sensitivity, would be undefined).
    """
    if not (math.isfinite(l2_clip_norm) and l2_clip_norm > 0):
        raise ValueError(f"l2_clip_norm must be positive and finite, got {l2_clip_norm}")
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("update holds a non-finite value; it cannot be clipped")
    scale = 1.0 if norm <= l2_clip_norm else l2_clip_norm / norm
    if isinstance(update, Mapping):
        return {name: _scaled(array, scale) for name, array in update.items()}, norm
    return _scaled(update, scale), norm


def _scaled(array: FloatArray, scale: float) -> FloatArray:
    array = np.asarray(array)
    if scale == 1.0:
        return array.copy()
    return (array.astype(np.float64) * scale).astype(array.dtype, copy=False)
