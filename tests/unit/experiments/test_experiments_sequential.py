"""Always-valid inference (mSPRT), the fixed-horizon Welch test, CUPED.

Simulations use fixed seeds; each tolerance is stated where it is used, as a number of
binomial or sampling standard deviations, so a correct implementation passes with
overwhelming probability and a wrong one (a missing factor 2, a p-value that is not running
min, a theta of the wrong sign) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from core.experiments.sequential import (
    AlwaysValidResult,
    ArmStats,
    Difference,
    PairedSums,
    always_valid_look,
    confidence_sequence_radius,
    cuped_adjust,
    cuped_arms,
    cuped_from_sums,
    cuped_theta,
    difference_in_means,
    msprt_log_likelihood_ratio,
    msprt_p_values,
    welch_p_values,
    welch_test,
)

ALPHA = 0.05


# --- per-arm summaries ------------------------------------------------------------------------


def test_arm_stats_match_numpy_and_merge_like_the_concatenation() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(3.0, 2.0, 400), rng.normal(-1.0, 0.5, 7)
    sa, sb = ArmStats.from_values(a), ArmStats.from_values(b)
    assert sa.count == 400 and sa.mean == pytest.approx(a.mean())
    assert sa.variance == pytest.approx(a.var(ddof=1))
    both = np.concatenate([a, b])
    merged = sa.merge(sb)
    assert merged.count == 407
    assert merged.mean == pytest.approx(both.mean())
    assert merged.variance == pytest.approx(both.var(ddof=1))
    assert ArmStats.from_values([]).merge(sb) == sb
    sums = ArmStats.from_sums(400, float(a.sum()), float((a * a).sum()))
    assert sums.mean == pytest.approx(sa.mean) and sums.variance == pytest.approx(sa.variance)


def test_difference_in_means_and_its_variance() -> None:
    control = ArmStats.from_values([1.0, 2.0, 3.0, 4.0])  # mean 2.5, var 5/3
    treatment = ArmStats.from_values([2.0, 4.0])  # mean 3, var 2
    diff = difference_in_means(control, treatment)
    assert diff.estimate == pytest.approx(0.5)
    assert diff.variance == pytest.approx((5 / 3) / 4 + 2 / 2)
    known = difference_in_means(control, treatment, known_variance=2.0)
    assert known.variance == pytest.approx(2.0 * (1 / 4 + 1 / 2))
    with pytest.raises(ValueError, match="at least 2 devices"):
        difference_in_means(ArmStats.from_values([1.0]), treatment)


# --- mSPRT ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimate", "variance", "tau"), [(0.0, 1.0, 1.0), (0.3, 0.01, 0.1), (-2.0, 0.5, 3.0)]
)
def test_log_likelihood_ratio_is_the_normal_mixture_integral(
    estimate: float, variance: float, tau: float
) -> None:
    # Lambda = integral over theta ~ N(0, tau^2) of N(D; theta, V) / N(D; 0, V).
    def integrand(theta: float) -> float:
        return float(
            stats.norm.pdf(estimate, theta, math.sqrt(variance))
            / stats.norm.pdf(estimate, 0.0, math.sqrt(variance))
            * stats.norm.pdf(theta, 0.0, tau)
        )

    numeric, _ = integrate.quad(integrand, -12 * tau, 12 * tau, points=[0.0, estimate], limit=200)
    assert float(msprt_log_likelihood_ratio(estimate, variance, tau=tau)) == pytest.approx(
        math.log(numeric), rel=1e-6, abs=1e-9
    )


def test_the_confidence_sequence_is_the_inverted_test() -> None:
    variance, tau = 0.004, 0.05
    radius = float(confidence_sequence_radius(variance, tau=tau, alpha=ALPHA))
    # At the boundary Lambda = 1/alpha; the null is excluded exactly when p < alpha.
    llr = float(msprt_log_likelihood_ratio(radius, variance, tau=tau))
    assert llr == pytest.approx(math.log(1 / ALPHA))
    for estimate in (0.9 * radius, 1.1 * radius, -1.1 * radius):
        result = always_valid_look(Difference(estimate, variance), tau=tau, alpha=ALPHA)
        assert (result.p_value < ALPHA) == (abs(estimate) > radius)
        assert (result.p_value < ALPHA) == (not result.lower <= 0.0 <= result.upper)
    # Wider than the fixed-horizon interval: the price of looking at any time.
    assert radius > stats.norm.ppf(1 - ALPHA / 2) * math.sqrt(variance)


def test_p_values_never_increase_and_intervals_never_widen() -> None:
    rng = np.random.default_rng(7)
    state: AlwaysValidResult | None = None
    values = rng.normal(0.0, 1.0, 2000)
    ps, widths = [], []
    for n in range(20, 2001, 20):
        control, treatment = ArmStats.from_values(values[:n:2]), ArmStats.from_values(values[1:n:2])
        diff = difference_in_means(control, treatment)
        state = always_valid_look(diff, tau=0.2, alpha=ALPHA, previous=state)
        ps.append(state.p_value)
        widths.append(state.upper - state.lower)
    assert state is not None and state.looks == 100
    assert all(b <= a for a, b in zip(ps, ps[1:], strict=False))
    assert all(b <= a + 1e-15 for a, b in zip(widths, widths[1:], strict=False))
    assert state.update(diff).looks == 101


def _brownian_looks(
    rng: np.random.Generator, runs: int, looks: int, effect: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative difference-in-means paths: `looks` looks of 20 new devices per arm each,
    per-device sd 1, so after k looks D ~ N(effect, 2 / (20 k)) with independent increments."""
    per_look = rng.normal(effect, math.sqrt(2 / 20), size=(runs, looks))
    k = np.arange(1, looks + 1)
    return np.cumsum(per_look, axis=1) / k, np.broadcast_to(2 / (20 * k), (runs, looks))


def test_peeking_after_every_look_keeps_the_false_positive_rate_below_alpha() -> None:
    rng = np.random.default_rng(2026)
    estimates, variances = _brownian_looks(rng, runs=4000, looks=100, effect=0.0)
    p = msprt_p_values(estimates, variances, tau=0.1)
    assert np.all(np.diff(p, axis=1) <= 0.0)
    fpr = float(np.mean(p[:, -1] < ALPHA))
    # Ville: at most alpha. sd of the estimate at 0.05 with 4,000 runs: 0.0034; allow 3 sd.
    assert fpr <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 4000)
    # The contrast that makes this test able to fail: a fixed-horizon z-test read at every
    # look rejects far more often (about 0.3 with 100 looks).
    z = np.abs(estimates) / np.sqrt(variances)
    naive = float(np.mean(np.any(z > stats.norm.ppf(1 - ALPHA / 2), axis=1)))
    assert naive > 0.2


def test_the_confidence_sequence_covers_the_true_effect_at_all_looks() -> None:
    rng = np.random.default_rng(99)
    effect = 0.15
    estimates, variances = _brownian_looks(rng, runs=4000, looks=100, effect=effect)
    radius = confidence_sequence_radius(variances, tau=0.1, alpha=ALPHA)
    covered_throughout = np.all(np.abs(estimates - effect) <= radius, axis=1)
    assert float(np.mean(covered_throughout)) >= 1 - ALPHA - 3 * math.sqrt(
        ALPHA * (1 - ALPHA) / 4000
    )


def test_a_real_effect_is_found_eventually() -> None:
    rng = np.random.default_rng(5)
    estimates, variances = _brownian_looks(rng, runs=500, looks=100, effect=0.2)
    p = msprt_p_values(estimates, variances, tau=0.1)
    # Fixed-horizon power at the last look is ~1 - 1e-9 (z = 0.2 / sqrt(1e-3) = 6.3); the
    # mSPRT pays some power for validity under peeking, but not at this size.
    assert float(np.mean(p[:, -1] < ALPHA)) > 0.99
    assert np.all(estimates[p[:, -1] < ALPHA, -1] > 0)


def test_degenerate_and_bad_inputs() -> None:
    assert float(msprt_log_likelihood_ratio(0.0, 0.0, tau=1.0)) == 0.0
    assert float(msprt_log_likelihood_ratio(0.1, 0.0, tau=1.0)) == math.inf
    assert float(confidence_sequence_radius(0.0, tau=1.0, alpha=ALPHA)) == 0.0
    with pytest.raises(ValueError, match="tau"):
        msprt_p_values([0.1], [0.1], tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        always_valid_look(Difference(0.1, 0.1), tau=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="variance"):
        always_valid_look(Difference(0.1, -0.1), tau=1.0, alpha=ALPHA)
    first = always_valid_look(Difference(0.1, 0.1), tau=1.0, alpha=ALPHA)
    with pytest.raises(ValueError, match="another tau"):
        always_valid_look(Difference(0.1, 0.1), tau=2.0, alpha=ALPHA, previous=first)


# --- fixed horizon ----------------------------------------------------------------------------


def test_welch_test_agrees_with_scipy_on_the_raw_data() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.0, 1.0, 80), rng.normal(0.4, 2.0, 50)
    result = welch_test(ArmStats.from_values(a), ArmStats.from_values(b), alpha=0.1)
    reference = stats.ttest_ind(b, a, equal_var=False)
    assert result.statistic == pytest.approx(reference.statistic)
    assert result.p_value == pytest.approx(reference.pvalue)
    assert result.df == pytest.approx(reference.df)
    ci = reference.confidence_interval(confidence_level=0.9)
    assert result.lower == pytest.approx(ci.low)
    assert result.upper == pytest.approx(ci.high)
    vectorized = welch_p_values(a.mean(), a.var(ddof=1), 80, b.mean(), b.var(ddof=1), 50)
    assert float(vectorized) == pytest.approx(reference.pvalue)


# --- CUPED ------------------------------------------------------------------------------------


def test_cuped_theta_is_the_regression_slope_and_zero_for_a_constant_covariate() -> None:
    rng = np.random.default_rng(11)
    x = rng.normal(0.5, 0.1, 1000)
    y = 0.2 + 0.8 * x + rng.normal(0, 0.05, 1000)
    assert cuped_theta(y, x) == pytest.approx(np.polyfit(x, y, 1)[0])
    assert cuped_theta(y, np.ones_like(x)) == 0.0
    adjusted = cuped_adjust(y, x, theta=0.8, x_mean=0.5)
    assert np.allclose(adjusted, y - 0.8 * (x - 0.5))
    with pytest.raises(ValueError, match="equal lengths"):
        cuped_theta(y, x[:-1])


def test_cuped_keeps_the_effect_unbiased_and_cuts_the_variance_by_one_minus_rho_squared() -> None:
    # Devices with persistent means: the pre-period metric x and the in-experiment metric y
    # share the device mean (sd 0.1) and have independent noise (sd 0.05): rho^2 = 0.8^2.
    rng = np.random.default_rng(2027)
    runs, n, effect = 2000, 200, 0.02
    mu = rng.normal(0.5, 0.1, (runs, 2, n))
    x = mu + rng.normal(0, 0.05, mu.shape)
    y = mu + rng.normal(0, 0.05, mu.shape)
    y[:, 1] += effect
    raw = y[:, 1].mean(axis=1) - y[:, 0].mean(axis=1)
    adjusted = np.empty(runs)
    for i in range(runs):
        cuped = cuped_arms([y[i, 0], y[i, 1]], [x[i, 0], x[i, 1]])
        adjusted[i] = cuped.adjusted[1].mean() - cuped.adjusted[0].mean()
    se = adjusted.std() / math.sqrt(runs)
    assert abs(adjusted.mean() - effect) < 4 * se
    rho2 = 0.01**2 / (0.0125 * 0.0125)  # cov^2 / (var x var y), var = 0.01 + 0.0025
    ratio = adjusted.var() / raw.var()
    # The variance ratio of 2,000 runs has a relative sd of about sqrt(2 / 2000) * sqrt(2) =
    # 0.045 against 1 - rho^2 = 0.36; allow 15% (more than 3 sd).
    assert ratio == pytest.approx(1 - rho2, rel=0.15)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.integers(2, 40),
       st.floats(-2.0, 2.0), st.floats(0.0, 3.0))
def test_cuped_from_sums_equals_cuped_on_the_devices_values(
        seed: int, n_control: int, n_treatment: int, slope: float, offset: float) -> None:
    """What an evaluation can release (per arm: count, sum y, y^2, x, x^2, xy) gives the same
    theta, x_mean and adjusted arm statistics as CUPED on every device's values."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=n) for n in (n_control, n_treatment)]
    ys = [slope * x + rng.normal(scale=0.5, size=x.size) + offset * i
          for i, x in enumerate(xs)]
    direct = cuped_arms(ys, xs)
    from_sums = cuped_from_sums([PairedSums.from_values(y, x) for y, x in zip(ys, xs,
                                                                            strict=True)])
    assert from_sums.theta == pytest.approx(direct.theta, rel=1e-9, abs=1e-9)
    assert from_sums.x_mean == pytest.approx(direct.x_mean, rel=1e-9, abs=1e-12)
    for stats_, values in zip(from_sums.arms, direct.adjusted, strict=True):
        expected = ArmStats.from_values(values)
        assert stats_.count == expected.count
        assert stats_.mean == pytest.approx(expected.mean, rel=1e-9, abs=1e-9)
        assert stats_.variance == pytest.approx(expected.variance, rel=1e-6, abs=1e-9)


def test_cuped_from_sums_with_a_constant_covariate_changes_nothing() -> None:
    y = [np.array([1.0, 2.0, 4.0]), np.array([3.0, 5.0])]
    x = [np.full(3, 7.0), np.full(2, 7.0)]
    result = cuped_from_sums([PairedSums.from_values(a, b) for a, b in zip(y, x, strict=True)])
    assert result.theta == 0.0
    assert [s.mean for s in result.arms] == pytest.approx([7 / 3, 4.0])
    with pytest.raises(ValueError, match="at least two devices"):
        cuped_from_sums([PairedSums.from_values([1.0], [2.0])])
