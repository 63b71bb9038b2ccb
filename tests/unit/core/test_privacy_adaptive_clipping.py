"""Adaptive clipping (Andrew et al. 2021): the clip norm converges to the target quantile of
the update norms, and the update's noise is raised to pay for the clipped bits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.privacy import (
    NoiseSource,
    clipped_bit,
    noisy_unclipped_fraction,
    update_clip_norm,
    update_noise_multiplier,
)


def test_a_device_reports_one_when_its_update_fits_under_the_clip_norm() -> None:
    assert clipped_bit(0.5, l2_clip_norm=1.0) == 1
    assert clipped_bit(1.0, l2_clip_norm=1.0) == 1
    assert clipped_bit(1.5, l2_clip_norm=1.0) == 0


def test_the_clip_norm_shrinks_when_too_many_fit_and_grows_when_too_few_do() -> None:
    kwargs = dict(target_quantile=0.5, learning_rate=0.2)
    assert update_clip_norm(l2_clip_norm=1.0, unclipped_fraction=0.9, **kwargs) < 1.0
    assert update_clip_norm(l2_clip_norm=1.0, unclipped_fraction=0.1, **kwargs) > 1.0
    assert update_clip_norm(l2_clip_norm=1.0, unclipped_fraction=0.5, **kwargs) == 1.0
    assert update_clip_norm(l2_clip_norm=2.0, unclipped_fraction=1.0, **kwargs) == pytest.approx(
        2.0 * math.exp(-0.1))


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_the_clip_norm_converges_to_the_target_quantile_of_synthetic_norms(
        quantile: float) -> None:
    rng = np.random.default_rng(0)
    source = NoiseSource.seeded(1)
    clients, sigma_b = 100, 100 / 20
    clip = 0.01  # far below every norm: starts fully clipped
    history = []
    for _ in range(400):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=clients)
        bits = [clipped_bit(n, l2_clip_norm=clip) for n in norms]
        fraction = noisy_unclipped_fraction(bits, bit_noise_std=sigma_b, source=source)
        clip = update_clip_norm(l2_clip_norm=clip, unclipped_fraction=fraction,
                                target_quantile=quantile, learning_rate=0.2)
        history.append(clip)
    true_quantile = math.exp(0.5 * float(np.quantile(rng.standard_normal(10**6), quantile)))
    assert np.mean(history[-100:]) == pytest.approx(true_quantile, rel=0.1)


def test_the_noisy_fraction_is_exact_without_noise_and_refuses_non_bits() -> None:
    source = NoiseSource.seeded(0)
    assert noisy_unclipped_fraction([1, 0, 1, 1], bit_noise_std=0.0, source=source) == 0.75
    with pytest.raises(ValueError, match="0 or 1"):
        noisy_unclipped_fraction([2], bit_noise_std=1.0, source=source)
    with pytest.raises(ValueError, match="no clipped bits"):
        noisy_unclipped_fraction([], bit_noise_std=1.0, source=source)


def test_the_update_noise_is_raised_to_pay_for_the_bits() -> None:
    z = 1.0
    z_delta = update_noise_multiplier(noise_multiplier=z, bit_noise_std=5.0)
    assert z_delta == pytest.approx((1.0 - 0.01) ** -0.5)
    # The two Gaussian mechanisms compose to one with multiplier z:
    assert z_delta**-2 + (2 * 5.0) ** -2 == pytest.approx(z**-2)
    assert update_noise_multiplier(noise_multiplier=z, bit_noise_std=1e12) == pytest.approx(z)
    with pytest.raises(ValueError, match="too small"):
        update_noise_multiplier(noise_multiplier=2.0, bit_noise_std=1.0)
