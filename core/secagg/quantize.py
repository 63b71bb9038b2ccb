"""Quantization of float updates to integers whose sum over n devices cannot wrap.

Each coordinate is clipped to [-clip, clip] (clipped values are counted, never hidden), mapped
to [0, 2^q - 1] with stochastic rounding (unbiased), and summed in Z_(2^b) with

    b = q + ceil(log2(n))        so that n * (2^q - 1) < 2^b: the sum never wraps.

Dequantizing the sum of n vectors gives the sum of the clipped floats with error at most
n * (2 clip / (2^q - 1)) per coordinate (each rounding moves a value by less than one step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.secagg.errors import SecAggError


@dataclass(frozen=True)
class Quantizer:
    clip: float
    value_bits: int
    num_devices: int

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise SecAggError(f"clip must be positive, got {self.clip}")
        if not 1 <= self.value_bits <= 40:
            raise SecAggError(f"value_bits must be in [1, 40], got {self.value_bits}")
        if self.num_devices < 1:
            raise SecAggError(f"num_devices must be at least 1, got {self.num_devices}")
        if self.modulus_bits > 62:
            raise SecAggError(f"{self.value_bits} value bits for {self.num_devices} devices need "
                            f"{self.modulus_bits} bits; at most 62 are supported")

    @property
    def modulus_bits(self) -> int:
        return self.value_bits + max(0, math.ceil(math.log2(self.num_devices)))

    @property
    def step(self) -> float:
        return float(2 * self.clip / (2**self.value_bits - 1))

    def quantize(self, x: npt.NDArray[np.floating], rng: np.random.Generator
                 ) -> tuple[npt.NDArray[np.uint64], int]:
        """(quantized vector, number of coordinates that were clipped)."""
        x = np.asarray(x, dtype=np.float64)
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        scaled = np.clip(x, -self.clip, self.clip)
        scaled += self.clip
        scaled *= 1.0 / self.step
        # floor(s + U), U ~ U[0, 1): rounds up with probability frac(s), i.e. unbiased.
        scaled += rng.random(x.shape)
        np.floor(scaled, out=scaled)
        np.minimum(scaled, 2**self.value_bits - 1, out=scaled)
        return scaled.astype(np.uint64), clipped

    def dequantize_sum(self, total: npt.NDArray[np.uint64], count: int) -> npt.NDArray[np.float64]:
        """The float sum of ``count`` quantized vectors from their integer sum."""
        return total.astype(np.float64) * self.step - count * self.clip
