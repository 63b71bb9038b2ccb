"""Noise sources and samplers: the secure source is a CSPRNG and production refuses seeded
ones; Gaussian noise has std z*C; discrete Gaussian shares add up to the planned variance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from core.privacy import (
    InsecureNoiseError,
    NoiseSource,
    add_gaussian_noise,
    device_noise_share,
    device_noise_share_simulated,
    discrete_gaussian,
    gaussian_noise,
)

MILLION = 1_000_000


def test_only_the_secure_source_is_secure_and_production_refuses_a_seeded_one() -> None:
    assert NoiseSource.secure().is_secure
    seeded = NoiseSource.seeded(7)
    assert not seeded.is_secure
    NoiseSource.secure().require_secure("central DP noise")
    with pytest.raises(InsecureNoiseError, match="central DP noise.*simulations only"):
        seeded.require_secure("central DP noise")


def test_sources_are_built_only_through_their_named_constructors() -> None:
    with pytest.raises(TypeError, match="secure"):
        NoiseSource(_generator=None, _token=object())


def test_a_seeded_source_is_reproducible_and_the_secure_one_never_repeats() -> None:
    np.testing.assert_array_equal(NoiseSource.seeded(3).standard_normal(10),
                                  NoiseSource.seeded(3).standard_normal(10))
    secure = NoiseSource.secure()
    assert not np.array_equal(secure.random_words(4), secure.random_words(4))


def test_uniforms_lie_strictly_inside_the_unit_interval() -> None:
    u = NoiseSource.secure().uniform(MILLION)
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("hardened", [True, False])
def test_secure_gaussian_noise_has_std_z_times_c_and_is_normal(hardened: bool) -> None:
    z, clip = 1.3, 0.7
    total = np.zeros(MILLION, dtype=np.float32)
    noisy = add_gaussian_noise(total, l2_clip_norm=clip, noise_multiplier=z,
                               source=NoiseSource.secure(), hardened=hardened)
    assert noisy.dtype == np.float64 and noisy.shape == total.shape
    assert abs(noisy.std() / (z * clip) - 1) < 0.01
    assert abs(noisy.mean()) < 5 * z * clip / math.sqrt(MILLION)
    # A fixed threshold: with a true normal this fails once in 10^4 runs.
    assert stats.kstest(noisy / (z * clip), "norm").pvalue > 1e-4


def test_noise_is_added_to_the_sum_without_modifying_it() -> None:
    total = np.arange(6, dtype=np.float64).reshape(2, 3)
    noisy = add_gaussian_noise(total, l2_clip_norm=1.0, noise_multiplier=1e-9,
                               source=NoiseSource.seeded(0))
    np.testing.assert_allclose(noisy, total, atol=1e-6)
    np.testing.assert_array_equal(total, np.arange(6).reshape(2, 3))


def test_gaussian_noise_has_the_requested_shape_and_refuses_negative_std() -> None:
    assert gaussian_noise((3, 5), stddev=1.0, source=NoiseSource.seeded(0)).shape == (3, 5)
    assert gaussian_noise(7, stddev=1.0, source=NoiseSource.secure()).shape == (7,)
    with pytest.raises(ValueError, match="stddev"):
        gaussian_noise(3, stddev=-1.0, source=NoiseSource.seeded(0))


@pytest.mark.parametrize("variance", [0.5, 4.0, 250.0])
def test_discrete_gaussian_matches_its_probability_mass_function(variance: float) -> None:
    samples = discrete_gaussian(200_000, variance=variance, source=NoiseSource.secure())
    assert samples.dtype == np.int64
    support = np.arange(-int(12 * math.sqrt(variance)) - 3, int(12 * math.sqrt(variance)) + 4)
    pmf = np.exp(-(support.astype(np.float64) ** 2) / (2 * variance))
    pmf /= pmf.sum()
    assert samples.var() == pytest.approx(float((pmf * support**2).sum()), rel=0.02)
    # Chi-square over the bins holding 99.9% of the mass, the tails pooled.
    counts = np.array([(samples == k).sum() for k in support])
    keep = pmf * samples.size > 20
    observed = np.append(counts[keep], samples.size - counts[keep].sum())
    expected = np.append(pmf[keep], 1 - pmf[keep].sum()) * samples.size
    assert stats.chisquare(observed, expected).pvalue > 1e-4


def test_discrete_gaussian_of_zero_variance_is_zero() -> None:
    np.testing.assert_array_equal(
        discrete_gaussian((2, 2), variance=0.0, source=NoiseSource.seeded(0)), np.zeros((2, 2)))


def test_device_shares_sum_to_the_planned_total_variance() -> None:
    devices, total_std = 20, 40.0
    shares = sum(device_noise_share(100_000, noise_stddev=total_std, devices_planned=devices,
                                    source=NoiseSource.secure()) for _ in range(devices))
    assert isinstance(shares, np.ndarray)
    assert shares.std() == pytest.approx(total_std, rel=0.01)


def test_device_shares_need_a_secure_source_and_a_share_variance_of_at_least_one() -> None:
    with pytest.raises(InsecureNoiseError):
        device_noise_share(3, noise_stddev=10.0, devices_planned=2, source=NoiseSource.seeded(0))
    assert device_noise_share_simulated(3, noise_stddev=10.0, devices_planned=2,
                                        source=NoiseSource.seeded(0)).shape == (3,)
    with pytest.raises(ValueError, match="finer quantization"):
        device_noise_share(3, noise_stddev=3.0, devices_planned=10, source=NoiseSource.secure())


def test_float32_fill_has_the_right_scale_and_shape_and_refuses_other_buffers() -> None:
    import torch

    from core.privacy.noise import fill_gaussian_

    out = torch.empty(1_000_001)
    fill_gaussian_(out, stddev=2.5, source=NoiseSource.secure())
    assert out.std().item() == pytest.approx(2.5, rel=0.01)
    assert abs(out.mean().item()) < 0.01
    assert stats.kstest(out.double().numpy() / 2.5, "norm").pvalue > 1e-3
    again = torch.empty(1_000_001)
    fill_gaussian_(again, stddev=2.5, source=NoiseSource.secure())
    assert not torch.equal(out, again)
    seeded = [fill_gaussian_(torch.empty(5), stddev=1.0, source=NoiseSource.seeded(4))
              for _ in range(2)]
    assert torch.equal(*seeded)
    with pytest.raises(ValueError, match="float32"):
        fill_gaussian_(torch.empty(3, dtype=torch.float64), stddev=1.0,
                       source=NoiseSource.secure())
    with pytest.raises(ValueError, match="stddev"):
        fill_gaussian_(out, stddev=-1.0, source=NoiseSource.secure())


def _keystream(key: bytes, count: int) -> bytes:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(count))


def _box_muller_pairs(stream: bytes, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, T) in float64 for a pass of ``pairs`` pairs: 64-bit radius words, then 32-bit
    angle words, as the fill's docstring lays them out."""
    words = np.frombuffer(stream, dtype=np.int64, count=pairs).astype(np.float64)
    radius = np.sqrt(-2 * np.log((np.abs(words) + 0.5) * 2.0**-63))
    angle = np.frombuffer(stream, dtype=np.int32, count=pairs, offset=8 * pairs) * (
        math.pi * 2.0**-31)
    return radius, angle


@pytest.mark.parametrize("hardened", [True, False])
def test_the_float32_fill_is_the_documented_box_muller_over_the_aes_keystream(
        hardened: bool) -> None:
    """Recomputed in float64 from the AES-256-CTR keystream alone: each pass of up to 2^16
    coordinates reads its pairs' 64-bit radius words, then their 32-bit angle words; hardened,
    coordinate k of a pass is (R_k cos T_k + R_{k+1} sin T_{k+1}) / sqrt(2) (mod the pass),
    so its two normals come from different random words; unhardened, a pass of 2^17
    coordinates is the pairs' cosine normals then their sine normals. A change of layout,
    pairing or scale fails here, bit patterns aside."""
    import torch

    from core.privacy.noise import _CHUNK, fill_gaussian_

    key, std = bytes(range(32)), 0.7
    count = 2 * _CHUNK + 3 if hardened else 4 * _CHUNK + 3
    out = torch.empty(count)
    fill_gaussian_(out, stddev=std, source=NoiseSource._fixed_key_for_tests(key),
                   hardened=hardened)
    per_pass = _CHUNK if hardened else 2 * _CHUNK
    stream = _keystream(key, 12 * count)
    expected, used = [], 0
    for first in range(0, count, per_pass):
        size = min(count - first, per_pass)
        pairs = size if hardened else (size + 1) // 2
        radius, angle = _box_muller_pairs(stream[used:used + 12 * pairs], pairs)
        used += 12 * pairs
        cosines, sines = radius * np.cos(angle), radius * np.sin(angle)
        if hardened:
            expected.append((cosines + np.roll(sines, -1)) * std / math.sqrt(2))
        else:
            expected.append(np.concatenate([cosines, sines[:size - pairs]]) * std)
    reference = np.concatenate(expected)
    error = np.abs(out.double().numpy() - reference)
    # float32 rounds u near 1 to 2^-24, which moves the smallest radii by up to ~5e-4.
    assert error.max() < 1e-3 * std
    assert np.quantile(error, 0.999) < 1e-5 * std
