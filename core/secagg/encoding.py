"""From a float update to a vector in the ring and back, keeping weighted FedAvg possible.

A device with ``e`` training examples uses the weight w = min(e, weight_cap). It quantizes
(w / weight_cap) * update (see :mod:`core.secagg.quantize`: coordinates clipped to +-clip,
counted, stochastically rounded to value_bits) and appends w itself as one more, exact,
coordinate. Summed over the m survivors, the server gets sum_i w_i/cap * update_i (to within
the quantization error) and sum_i w_i exactly, hence the weighted mean

    mean = cap * dequantized_sum / sum_i w_i,

with error per coordinate at most m * step * cap / sum_i w_i, step = 2 clip / (2^value_bits - 1)
(each stochastic rounding moves a value by less than one step). The ring has room for
n (2^value_bits - 1) (:func:`core.secagg.params.derive`), so neither the values nor the
weight coordinate can wrap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.secagg.masks import ring_dtype
from core.secagg.messages import RingVector
from core.secagg.params import SecAggParams
from core.secagg.quantize import Quantizer


@dataclass(frozen=True)
class Encoded:
    vector: RingVector
    clipped: int  # coordinates that were outside +-clip before quantization
    weight: int


def _quantizer(params: SecAggParams) -> Quantizer:
    return Quantizer(clip=params.clip, value_bits=params.value_bits,
                     num_devices=params.num_devices)


def encode_update(update: npt.NDArray[np.floating], num_examples: int, params: SecAggParams,
                  rng: np.random.Generator) -> Encoded:
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    weight = min(num_examples, params.weight_cap)
    scaled = np.asarray(update, dtype=np.float64).ravel() * (weight / params.weight_cap)
    values, clipped = _quantizer(params).quantize(scaled, rng)
    out = np.empty(len(values) + 1, dtype=ring_dtype(params.ring_bits))
    out[:-1] = values
    out[-1] = weight
    return Encoded(out, clipped, weight)


def decode_mean(total: RingVector, count: int, params: SecAggParams
                ) -> tuple[npt.NDArray[np.float64], int]:
    """(weighted mean update, total weight) from the ring sum of ``count`` encoded updates."""
    weight = int(total[-1])
    if count < 1 or weight < count:
        raise ValueError(f"a sum of {count} updates cannot carry a total weight of {weight}")
    summed = _quantizer(params).dequantize_sum(total[:-1].astype(np.uint64), count)
    return summed * (params.weight_cap / weight), weight


def max_mean_error(count: int, total_weight: int, params: SecAggParams) -> float:
    """The bound on |decoded mean - exact weighted mean of the clipped updates| per coordinate."""
    return count * _quantizer(params).step * params.weight_cap / total_weight


# ---------------------------------------------------------------- distributed DP in the ring


# ---------------------------------------------------------------- metrics inside the mask

#: The summary metrics a device contributes inside its masked vector, in order, each with the
#: bound it is clipped to (values are clipped to [0, bound]). ``eval_*`` are multiplied by
#: ``evaluated`` (1 when the device evaluated this round, else 0), so their sums cover the
#: evaluating devices only.
MASKED_METRICS: tuple[tuple[str, float], ...] = (
    ("train_loss", 20.0),
    ("eval_loss", 20.0),
    ("eval_accuracy", 1.0),
    ("evaluated", 1.0),
)


def masked_metric_values(metrics: Mapping[str, float], clip: float
                         ) -> npt.NDArray[np.float64]:
    """The values a device appends to its update before encoding: each metric of
    :data:`MASKED_METRICS` clipped to [0, bound] and scaled to [0, clip] (the quantizer's
    range). They are weighted like the update (w / weight_cap), so the decoded mean of each
    is the example-weighted mean over the survivors."""
    evaluated = 1.0 if "eval_loss" in metrics else 0.0
    out = np.empty(len(MASKED_METRICS), dtype=np.float64)
    for i, (name, bound) in enumerate(MASKED_METRICS):
        if name == "evaluated":
            value = evaluated
        else:
            value = float(metrics.get(name, 0.0))
            if name.startswith("eval_"):
                value *= evaluated
        if not math.isfinite(value):
            value = bound
        out[i] = min(max(value, 0.0), bound) / bound * clip
    return out


def masked_metric_means(decoded: npt.NDArray[np.floating], clip: float) -> dict[str, float]:
    """The round's metrics from the decoded weighted means of the :data:`MASKED_METRICS`
    coordinates: ``train_loss`` over all survivors, ``eval_*`` over the evaluating ones
    (absent when nobody evaluated). Means within the quantization error."""
    means = {name: float(decoded[i]) / clip * bound
             for i, (name, bound) in enumerate(MASKED_METRICS)}
    evaluated = means.pop("evaluated")
    out = {"train_loss": means["train_loss"]}
    if evaluated > 1e-6:
        out.update({k: v / evaluated for k, v in means.items() if k.startswith("eval_")})
    return out


def distributed_value_bits(num_devices: int, noise_multiplier: float, ring_bits: int = 32
                           ) -> int:
    """Value bits that leave the ring room for the sum of ``num_devices`` quantized values
    plus the devices' integer noise far into its tail. With the per-coordinate clip equal to
    the L2 clip C, the total noise std is ``z C / step = z (2^q - 1) / 2`` steps, so
    ``(n + 8 z + 1) 2^q < 2^(R-1)`` keeps sum and 16 std of noise inside half the ring
    (:func:`unwrap_noisy_total` reads the other half as negative)."""
    return ring_bits - 1 - math.ceil(math.log2(num_devices + 8 * noise_multiplier + 1))


def noise_std_in_steps(params: SecAggParams, noise_multiplier: float) -> float:
    """The total noise std, in quantization steps, of noise multiplier z times the clip."""
    return noise_multiplier * params.clip / _quantizer(params).step


def add_noise_share(vector: RingVector, share: npt.NDArray[np.int64]) -> RingVector:
    """``vector`` with an integer noise share added to its value coordinates (not to the
    last, the weight), modulo the ring."""
    out = vector.copy()
    out[:-1] += share.astype(out.dtype)  # two's complement: negative shares wrap correctly
    return out


def unwrap_noisy_total(total: RingVector, count: int, params: SecAggParams
                       ) -> npt.NDArray[np.float64]:
    """The ring sum of ``count`` noised encodings as signed integers (the noise may take a
    coordinate below zero, which the ring wrapped), then dequantized to the float sum of the
    updates plus the noise (in update units). The weight coordinate is dropped."""
    modulus = 1 << params.ring_bits
    values = total[:-1].astype(np.float64)
    midpoint = (count * (2**params.value_bits - 1) + modulus) / 2
    values[values > midpoint] -= modulus
    return values * _quantizer(params).step - count * params.clip
