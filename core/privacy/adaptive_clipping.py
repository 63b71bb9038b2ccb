"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, "Differentially
Private Learning with Adaptive Clipping"): the clip norm C tracks a target quantile gamma of
the devices' update norms, privately.

Per round, each participating device reports one bit with its clipped update::

    b_i = 1 if ||update_i|| <= C else 0                       (clipped_bit)

and the server, with m reports and Gaussian noise of std sigma_b on the bit count, sets::

    b~    = (sum_i b_i + N(0, sigma_b^2)) / m                  (noisy_unclipped_fraction)
    C_new = C * exp(-eta * (b~ - gamma))                        (update_clip_norm)

The bits cost privacy too. To keep the round's total noise multiplier z, the update itself is
noised with (the paper's Theorem 1; bits are centred to +-1/2, sensitivity 1/2)::

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)                    (update_noise_multiplier)

which requires 2 sigma_b > z. The paper suggests sigma_b = m / 20 and eta = 0.2.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from core.privacy.noise import NoiseSource, gaussian_noise


def clipped_bit(update_norm: float, *, l2_clip_norm: float) -> int:
    """1 if the device's update norm is at most the clip norm (it was not clipped), else 0."""
    return int(update_norm <= l2_clip_norm)


def noisy_unclipped_fraction(bits: npt.ArrayLike, *, bit_noise_std: float,
                             source: NoiseSource) -> float:
    """The noised fraction of unclipped updates: ``(sum(bits) + N(0, bit_noise_std^2)) / m``.

    Raises:
        ValueError: no bits, a bit other than 0/1, or a negative ``bit_noise_std``.
    """
    values = np.asarray(bits)
    if values.size == 0:
        raise ValueError("no clipped bits")
    if not np.all((values == 0) | (values == 1)):
        raise ValueError("clipped bits must be 0 or 1")
    if not (math.isfinite(bit_noise_std) and bit_noise_std >= 0):
        raise ValueError(f"bit_noise_std must be >= 0 and finite, got {bit_noise_std}")
    noise = float(gaussian_noise(1, stddev=bit_noise_std, source=source)[0])
    return (float(values.sum()) + noise) / values.size


def update_clip_norm(*, l2_clip_norm: float, unclipped_fraction: float, target_quantile: float,
                     learning_rate: float) -> float:
    """The geometric update ``C * exp(-learning_rate * (unclipped_fraction - target_quantile))``:
    C shrinks when more than the target fraction fit under it, grows when fewer do.

    Raises:
        ValueError: ``l2_clip_norm`` or ``learning_rate`` not positive, or
            ``target_quantile`` outside [0, 1].
    """
    if not (math.isfinite(l2_clip_norm) and l2_clip_norm > 0):
        raise ValueError(f"l2_clip_norm must be positive and finite, got {l2_clip_norm}")
    if not 0 <= target_quantile <= 1:
        raise ValueError(f"target_quantile must be in [0, 1], got {target_quantile}")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    return l2_clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def update_noise_multiplier(*, noise_multiplier: float, bit_noise_std: float) -> float:
    """``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the multiplier for the update so that the
    update and the bit count together cost what one Gaussian mechanism with ``z`` does.
    ``bit_noise_std == inf`` (no bits released) gives ``z``.

    Raises:
        ValueError: ``2 * bit_noise_std <= noise_multiplier`` (the bits alone would exceed
            the budget) or non-positive arguments.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier}")
    if not bit_noise_std > 0:
        raise ValueError(f"bit_noise_std must be positive, got {bit_noise_std}")
    if 2 * bit_noise_std <= noise_multiplier:
        raise ValueError(
            f"bit_noise_std {bit_noise_std} is too small for noise multiplier "
            f"{noise_multiplier}: it must exceed noise_multiplier / 2 = {noise_multiplier / 2}")
    return float((noise_multiplier**-2 - (2 * bit_noise_std) ** -2) ** -0.5)
