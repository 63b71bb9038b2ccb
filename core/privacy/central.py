"""Central DP over a round's updates (DP-FedAvg, McMahan et al., ICLR 2018): the coordinator
clips every update to ``l2_clip_norm``, sums them with *equal* weights (an example-count
weight would let one device's influence exceed the clip), adds Gaussian noise of std
``noise_multiplier * l2_clip_norm`` once to the sum, and divides by the number of reports.

:class:`ClippedSum` is the streaming accumulator: memory O(model), one float64 sum.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from core.privacy.clipping import l2_norm
from core.privacy.noise import NoiseSource, gaussian_noise


class ClippedSum:
    """Running sum of flat updates, each clipped to ``l2_clip_norm``. Not thread-safe."""

    def __init__(self, size: int, *, l2_clip_norm: float) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._sum = np.zeros(size, dtype=np.float64)
        self._count = 0
        self._l2_clip_norm = l2_clip_norm
        self._norms: list[float] = []

    @property
    def count(self) -> int:
        return self._count

    @property
    def norms(self) -> list[float]:
        """The unclipped norm of every update added (for adaptive clipping's bits)."""
        return list(self._norms)

    def add(self, update: npt.NDArray[np.floating], *, weight: float = 1.0) -> float:
        """Clips ``update`` (flat, ``size`` elements) and adds it times ``weight`` (in
        [0, 1], so the sensitivity stays ``l2_clip_norm``: an asynchronous update's staleness
        weight); returns its original norm.

        Raises:
            ValueError: wrong size, a non-finite value, or a weight outside [0, 1].
        """
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1] (it would raise the sensitivity), "
                             f"got {weight}")
        flat = np.asarray(update).reshape(-1)
        if flat.size != self._sum.size:
            raise ValueError(f"update has {flat.size} elements, expected {self._sum.size}")
        norm = l2_norm(flat)
        if not math.isfinite(norm):
            raise ValueError("update holds a non-finite value; it cannot be clipped")
        # Scaled while accumulating (one pass, as FedAvg's weighted add): no clipped copy.
        scale = weight if norm <= self._l2_clip_norm else weight * self._l2_clip_norm / norm
        self._sum += np.multiply(flat, scale, dtype=np.float64)
        self._count += 1
        self._norms.append(norm)
        return norm

    @property
    def total(self) -> npt.NDArray[np.float64]:
        """The clipped sum so far (a copy), before any noise."""
        return self._sum.copy()

    def release_mean(self, *, noise_multiplier: float, source: NoiseSource,
                     require_secure: bool = True, denominator: int | None = None
                     ) -> npt.NDArray[np.float64]:
        """``(sum + N(0, (noise_multiplier * l2_clip_norm)^2)) / denominator``.

        ``denominator`` None divides by the number of updates added. DP-FedAvg divides by a
        *fixed* number, the expected number of reports (McMahan et al. 2018): dividing by the
        actual count would make the sensitivity depend on who reported.

        Raises:
            InsecureNoiseError: ``source`` is seeded and ``require_secure`` (production).
            ValueError: nothing was added, or ``denominator`` is below 1.
        """
        if denominator is not None and denominator < 1:
            raise ValueError(f"denominator must be at least 1, got {denominator}")
        if require_secure:
            source.require_secure("central DP noise")
        if self._count == 0:
            raise ValueError("no update was added")
        noisy = gaussian_noise(self._sum.size, stddev=noise_multiplier * self._l2_clip_norm,
                               source=source)
        noisy += self._sum
        noisy /= self._count if denominator is None else denominator
        return noisy
