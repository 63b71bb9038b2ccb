"""Distributed DP: every device adds its share of discrete Gaussian noise to its quantized,
clipped update *before* secure-aggregation masking, so the coordinator only ever sees the
sum, which carries the full noise when every selected device reports.

With ``n`` devices planned and a total noise standard deviation ``sigma = z * C`` (noise
multiplier ``z``, clip ``C``, both in the units of the quantized integers), each device adds
N_Z(0, sigma^2 / n). Sums of discrete Gaussians are not exactly discrete Gaussian, but are
within a negligible distance of one when each share's variance is at least ~1 (Kairouz, Liu
and Steinke, ICML 2021, "The Distributed Discrete Gaussian Mechanism"); :func:`device_noise_share`
refuses smaller shares.

Dropouts
--------
Noise is added by devices, so a device that does not report takes its share with it: when
only ``m`` of ``n`` report, the sum holds variance ``m/n * sigma^2`` and the effective noise
multiplier is ``z * sqrt(m / n)``. The sensitivity is unchanged (one device's clipped
update), so the guarantee degrades to that of the smaller multiplier.
:func:`received_epsilon` says what a round history really cost, and
:func:`check_noise_floor` is the round's gate: below the configured floor, the aggregate must
not be released (the round aborts and is redone).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from core.privacy.accounting import AccountingMethod, MechanismSteps, epsilon_of_history
from core.privacy.errors import NoiseFloorError
from core.privacy.noise import NoiseSource, discrete_gaussian

#: Smallest per-device variance (in quantized units) for which the sum of shares is treated
#: as a discrete Gaussian of the total variance.
MIN_SHARE_VARIANCE = 1.0


def device_noise_variance(*, noise_stddev: float, devices_planned: int) -> float:
    """The variance each of ``devices_planned`` devices adds: ``noise_stddev^2 / n``."""
    if devices_planned < 1:
        raise ValueError(f"devices_planned must be at least 1, got {devices_planned}")
    if not (math.isfinite(noise_stddev) and noise_stddev >= 0):
        raise ValueError(f"noise_stddev must be >= 0 and finite, got {noise_stddev}")
    return noise_stddev**2 / devices_planned


def device_noise_share(shape: int | Sequence[int], *, noise_stddev: float,
                       devices_planned: int, source: NoiseSource) -> npt.NDArray[np.int64]:
    """One device's integer noise share: N_Z(0, noise_stddev^2 / devices_planned) per
    coordinate, where ``noise_stddev`` is the *total* standard deviation the full sum must
    carry, in quantized units (``noise_multiplier * clip / quantization step``). Add it to
    the quantized update modulo the ring size before masking; the ring must have headroom
    for the noise's tail (e.g. 8 * noise_stddev beyond the sum's range).

    Raises:
        ValueError: a share variance below ``MIN_SHARE_VARIANCE``, or bad arguments.
        InsecureNoiseError: ``source`` is seeded (device noise is always production noise;
            simulations call :func:`device_noise_share_simulated`).
    """
    source.require_secure("distributed-DP device noise")
    return _share(shape, noise_stddev, devices_planned, source)


def device_noise_share_simulated(shape: int | Sequence[int], *, noise_stddev: float,
                                 devices_planned: int, source: NoiseSource
                                 ) -> npt.NDArray[np.int64]:
    """:func:`device_noise_share` that also accepts a seeded source: simulations only."""
    return _share(shape, noise_stddev, devices_planned, source)


def _share(shape: int | Sequence[int], noise_stddev: float, devices_planned: int,
           source: NoiseSource) -> npt.NDArray[np.int64]:
    variance = device_noise_variance(noise_stddev=noise_stddev, devices_planned=devices_planned)
    if variance < MIN_SHARE_VARIANCE:
        raise ValueError(
            f"each device's noise variance {variance:.3g} is below {MIN_SHARE_VARIANCE} "
            f"quantization steps^2; use a finer quantization (smaller step) or fewer devices")
    return discrete_gaussian(shape, variance=variance, source=source)


def effective_noise_multiplier(*, noise_multiplier: float, devices_planned: int,
                               devices_reported: int) -> float:
    """``noise_multiplier * sqrt(devices_reported / devices_planned)``: the multiplier the
    sum actually carries when only ``devices_reported`` of ``devices_planned`` devices added
    their share.

    Raises:
        ValueError: counts out of range (reported must be in [0, planned]).
    """
    if devices_planned < 1:
        raise ValueError(f"devices_planned must be at least 1, got {devices_planned}")
    if not 0 <= devices_reported <= devices_planned:
        raise ValueError(f"devices_reported must be in [0, {devices_planned}], got "
                         f"{devices_reported}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
    return noise_multiplier * math.sqrt(devices_reported / devices_planned)


def check_noise_floor(*, noise_multiplier: float, devices_planned: int, devices_reported: int,
                      min_noise_multiplier: float) -> float:
    """The round's gate before releasing a distributed-DP sum: returns the effective noise
    multiplier, or raises if it is below ``min_noise_multiplier``.

    Raises:
        NoiseFloorError: too few reports; the message says how many were needed.
        ValueError: bad arguments.
    """
    effective = effective_noise_multiplier(noise_multiplier=noise_multiplier,
                                           devices_planned=devices_planned,
                                           devices_reported=devices_reported)
    if effective < min_noise_multiplier:
        needed = min_reports_for_floor(noise_multiplier=noise_multiplier,
                                       devices_planned=devices_planned,
                                       min_noise_multiplier=min_noise_multiplier)
        need = (f"at least {needed} of {devices_planned} reports are needed" if needed is not None
                else "no number of reports reaches it: lower the floor or add noise")
        raise NoiseFloorError(
            f"only {devices_reported} of {devices_planned} devices reported: the sum carries "
            f"noise multiplier {effective:.4g}, below the floor {min_noise_multiplier:.4g}; "
            f"{need}. The aggregate must not be released",
            effective_noise_multiplier=effective, min_noise_multiplier=min_noise_multiplier)
    return effective


def min_reports_for_floor(*, noise_multiplier: float, devices_planned: int,
                          min_noise_multiplier: float) -> int | None:
    """The fewest reports whose noise meets ``min_noise_multiplier`` (None if even all
    ``devices_planned`` do not)."""
    if noise_multiplier <= 0:
        return None if min_noise_multiplier > 0 else 0
    needed = math.ceil(devices_planned * (min_noise_multiplier / noise_multiplier) ** 2 - 1e-9)
    needed = max(needed, 0)
    return needed if needed <= devices_planned else None


def received_epsilon(*, rounds: Sequence[tuple[int, int]], noise_multiplier: float,
                     sampling_rate: float, delta: float,
                     method: AccountingMethod | str = AccountingMethod.RDP) -> float:
    """The epsilon actually spent by distributed-DP rounds given as
    ``(devices_planned, devices_reported)`` pairs, each released with the effective noise
    multiplier of its reports (Poisson sampling at ``sampling_rate``).

    Raises:
        ValueError: bad arguments, or a released round with no report (no noise at all).
    """
    history = []
    for planned, reported in rounds:
        z = effective_noise_multiplier(noise_multiplier=noise_multiplier,
                                       devices_planned=planned, devices_reported=reported)
        if z == 0:
            raise ValueError("a round released with zero noise has unbounded epsilon")
        history.append(MechanismSteps(z, sampling_rate, 1))
    return epsilon_of_history(history, delta=delta, method=method)
