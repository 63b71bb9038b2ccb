"""Sample-ratio mismatch: a chi-square test of devices per arm against the split."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from core.experiments.srm import DEFAULT_SRM_THRESHOLD, srm_check


def test_counts_exactly_on_the_split_are_not_flagged() -> None:
    result = srm_check([5000, 5000], [0.5, 0.5])
    assert result.p_value == pytest.approx(1.0)
    assert result.statistic == pytest.approx(0.0)
    assert not result.flagged
    assert result.threshold == DEFAULT_SRM_THRESHOLD == 0.001


def test_statistic_and_p_value_are_pearsons_chi_square() -> None:
    # (520 - 500)^2 / 500 * 2 = 1.6 on 1 degree of freedom; P(chi2_1 > x) = erfc(sqrt(x / 2)).
    result = srm_check([520, 480], [0.5, 0.5])
    assert result.statistic == pytest.approx(1.6)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(0.8)))
    assert result.expected == (500.0, 500.0)
    # Three arms: 2 degrees of freedom, P(chi2_2 > x) = exp(-x / 2).
    three = srm_check([230, 270, 500], [0.25, 0.25, 0.5])
    assert three.statistic == pytest.approx(2 * 20**2 / 250)
    assert three.p_value == pytest.approx(math.exp(-three.statistic / 2))


def test_a_52_48_skew_on_20k_devices_is_flagged_and_described() -> None:
    result = srm_check([10_400, 9_600], [0.5, 0.5])
    assert result.statistic == pytest.approx(32.0)
    assert result.flagged and result.p_value < 1e-7
    assert "sample ratio mismatch" in result.describe()
    assert "10400 observed vs 10000.0 expected" in result.describe()


def test_healthy_assignments_raise_false_alarms_at_the_threshold_rate() -> None:
    # 4,000 correctly randomized experiments of 10,000 devices split 30/70: p-values are
    # uniform, so about 4 of 4,000 fall below 0.001; P(Binomial(4000, 0.001) > 12) < 1e-4.
    rng = np.random.default_rng(20261207)
    treated = rng.binomial(10_000, 0.7, size=4_000)
    results = [srm_check([10_000 - t, t], [0.3, 0.7]) for t in treated]
    assert sum(r.flagged for r in results) <= 12
    # The discrete binomial makes p-values only nearly uniform; the KS test at 1e-3 is loose
    # enough for that and still fails a statistic off by a factor (e.g. variance not divided).
    assert stats.kstest([r.p_value for r in results], "uniform").pvalue > 1e-3


def test_a_device_in_a_zero_weight_arm_is_a_certain_mismatch() -> None:
    assert srm_check([10, 0, 10], [0.5, 0.0, 0.5]).p_value == pytest.approx(1.0)
    result = srm_check([10, 1, 10], [0.5, 0.0, 0.5])
    assert result.flagged and result.p_value == 0.0


def test_no_devices_yet_is_nothing_to_flag() -> None:
    result = srm_check([0, 0], [0.5, 0.5])
    assert not result.flagged and result.p_value == 1.0


@pytest.mark.parametrize(
    ("counts", "weights", "threshold"),
    [
        ([1, 2, 3], [0.5, 0.5], 0.001),
        ([1, -2], [0.5, 0.5], 0.001),
        ([1, 2], [0.6, 0.6], 0.001),
        ([1, 2], [0.5, 0.5], 0.0),
        ([1, 2], [0.5, 0.5], 1.0),
    ],
)
def test_bad_arguments_are_refused(
    counts: list[int], weights: list[float], threshold: float
) -> None:
    with pytest.raises(ValueError):
        srm_check(counts, weights, threshold=threshold)
