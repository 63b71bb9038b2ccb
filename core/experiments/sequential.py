"""Comparing two arms: always-valid inference (mSPRT), the fixed-horizon Welch test, CUPED.

**The unit is the device.** Devices are assigned, so devices are the independent draws. Feed
one value per device per arm: its mean over the reports it sent so far (pre-period adjusted
with CUPED where a covariate exists). Pooling reports as if independent understates the
variance whenever a device reports more than once (device effects repeat), and every test
here then rejects too often. With per-device cumulative means, the difference of arm means at
successive looks has (to a good approximation) the canonical joint distribution of sequential
analysis, Cov(D_s, D_t) = Var(D_max(s, t)): the score D/V is a Brownian motion in the
information 1/V, which is what the mixture martingale below needs.

**Always-valid inference** (mixture SPRT; Robbins 1970, Johari et al. 2017 "Peeking at A/B
tests", Howard et al. 2021 "Time-uniform, nonparametric, nonasymptotic confidence
sequences"). Let D be the estimated difference treatment - control and V its variance
(sigma_c^2/n_c + sigma_t^2/n_t). Mixing the Gaussian likelihood ratio of effect theta against
the null theta_0 over theta ~ N(theta_0, tau^2) gives

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (D - theta_0)^2 / (2 V (V + tau^2)))

a nonnegative martingale under the null, so by Ville's inequality P(sup Lambda >= 1/alpha)
<= alpha. Hence ``p_t = min(1, min_{s<=t} 1/Lambda_s)`` is a p-value valid at any data-
dependent stopping time (look every round: it stays valid), and inverting Lambda < 1/alpha
gives the confidence sequence

    D +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) + 2 log(1 / alpha)))

that covers the true effect at all looks at once with probability >= 1 - alpha.
``tau`` is the scale of effects the test is tuned to find fastest; the minimum detectable
effect is a good choice. Variances are either known or estimated from the data (plug-in, the
usual practice; accurate once each arm has a few dozen devices).

**Fixed horizon**: Welch's two-sample t-test (:func:`scipy.stats.ttest_ind_from_stats`), valid
only if looked at once, at the planned horizon. It is reported alongside for comparison; a
decision must not be taken on it before the horizon (benchmarks/experiments.py shows the
false-positive rate of doing so).

**CUPED** (Deng et al. 2013): y_adj = y - theta (x - mean(x)) with theta = cov(y, x) / var(x)
for a pre-period covariate x (the same metric before the experiment). Computing theta and
mean(x) on the arms pooled keeps the difference in means unbiased (x is independent of the
assignment) and cuts its variance by the factor 1 - corr(y, x)^2.

Everything is a pure function or a frozen value; functions marked "vectorized" take numpy
arrays of any shape (the benchmark runs 1,000 experiments at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# Per-arm summaries


@dataclass(frozen=True)
class ArmStats:
    """Count, mean and sum of squared deviations (``m2``) of one arm's per-device values.

    Mergeable (:meth:`merge`, Chan et al.), and buildable from sums (:meth:`from_sums`), the
    form in which secure aggregation releases them.
    """

    count: int
    mean: float
    m2: float

    def __post_init__(self) -> None:
        if self.count < 0 or self.m2 < 0.0 or not math.isfinite(self.mean):
            raise ValueError(f"invalid arm statistics: {self!r}")

    @classmethod
    def from_values(cls, values: npt.ArrayLike) -> ArmStats:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return cls(0, 0.0, 0.0)
        mean = float(v.mean())
        return cls(int(v.size), mean, float(np.sum((v - mean) ** 2)))

    @classmethod
    def from_sums(cls, count: int, total: float, total_of_squares: float) -> ArmStats:
        """From n, sum(y) and sum(y^2). Less accurate than :meth:`from_values` when the mean
        is large against the spread (cancellation); clamped at zero variance."""
        if count == 0:
            return cls(0, 0.0, 0.0)
        mean = total / count
        return cls(count, mean, max(0.0, total_of_squares - count * mean * mean))

    @property
    def variance(self) -> float:
        """Sample variance (ddof 1); ``nan`` below two values."""
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    def merge(self, other: ArmStats) -> ArmStats:
        n = self.count + other.count
        if n == 0:
            return self
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n
        m2 = self.m2 + other.m2 + delta * delta * self.count * other.count / n
        return ArmStats(n, mean, m2)


@dataclass(frozen=True)
class Difference:
    """``estimate`` = mean(treatment) - mean(control); ``variance`` = its variance."""

    estimate: float
    variance: float


def difference_in_means(
    control: ArmStats, treatment: ArmStats, *, known_variance: float | None = None
) -> Difference:
    """The difference of arm means and its variance: sigma^2 (1/n_c + 1/n_t) with a known
    per-device variance, else s_c^2/n_c + s_t^2/n_t (unequal variances, as Welch).

    Raises ``ValueError`` when an arm has fewer than two devices (one with a known variance).
    """
    need = 1 if known_variance is not None else 2
    if control.count < need or treatment.count < need:
        raise ValueError(
            f"each arm needs at least {need} devices, got {control.count} and {treatment.count}"
        )
    if known_variance is not None:
        if not known_variance > 0.0:
            raise ValueError(f"known_variance must be > 0, got {known_variance!r}")
        variance = known_variance * (1.0 / control.count + 1.0 / treatment.count)
    else:
        variance = control.variance / control.count + treatment.variance / treatment.count
    return Difference(treatment.mean - control.mean, variance)


# ---------------------------------------------------------------------------------------------
# Mixture SPRT (always valid)


def _check_tau_alpha(tau: float, alpha: float | None = None) -> None:
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if alpha is not None and not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def msprt_log_likelihood_ratio(
    estimate: npt.ArrayLike, variance: npt.ArrayLike, *, tau: float, null: float = 0.0
) -> FloatArray:
    """log Lambda of the normal-mixture SPRT (module docstring). Vectorized.

    A zero variance with a nonzero difference gives +inf (certain evidence), with a zero
    difference 0 (none).
    """
    _check_tau_alpha(tau)
    d = np.asarray(estimate, dtype=np.float64) - null
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    with np.errstate(divide="ignore", invalid="ignore"):
        llr = 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2.0 * v * (v + t2))
    return np.where(v > 0.0, llr, np.where(d == 0.0, 0.0, np.inf))


def msprt_p_values(
    estimates: npt.ArrayLike, variances: npt.ArrayLike, *, tau: float, null: float = 0.0
) -> FloatArray:
    """Always-valid p-values along the last axis (the looks): the running minimum of
    min(1, 1/Lambda). Non-increasing along that axis. Vectorized."""
    llr = msprt_log_likelihood_ratio(estimates, variances, tau=tau, null=null)
    per_look = np.exp(-np.maximum(llr, 0.0))
    return np.minimum.accumulate(per_look, axis=-1)


def confidence_sequence_radius(variance: npt.ArrayLike, *, tau: float, alpha: float) -> FloatArray:
    """Half-width of the (1 - alpha) normal-mixture confidence sequence at each look.
    Vectorized; zero variance gives zero width."""
    _check_tau_alpha(tau, alpha)
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(v * (v + t2) / t2 * (np.log((v + t2) / v) + 2.0 * math.log(1.0 / alpha)))
    return np.where(v > 0.0, r, 0.0)


@dataclass(frozen=True)
class AlwaysValidResult:
    """The state of one always-valid comparison after ``looks`` looks.

    ``p_value`` is the running minimum (never increases); ``[lower, upper]`` is the running
    intersection of the confidence sequence (never widens). Both stay valid however often and
    whenever one looks, so stopping when ``p_value < alpha`` keeps the error rate below alpha.
    ``p_value < alpha`` exactly when the null was outside the interval at some look.
    ``lower > upper`` would mean the looks contradict each other beyond chance: the model
    (a constant effect, independent devices) is wrong.
    """

    looks: int
    estimate: float
    variance: float
    p_value: float
    lower: float
    upper: float
    tau: float
    alpha: float
    null: float = 0.0

    def update(self, difference: Difference) -> AlwaysValidResult:
        """The state after one more look at ``difference`` (cumulative, not the increment)."""
        return always_valid_look(
            difference, tau=self.tau, alpha=self.alpha, null=self.null, previous=self
        )


def always_valid_look(
    difference: Difference,
    *,
    tau: float,
    alpha: float,
    null: float = 0.0,
    previous: AlwaysValidResult | None = None,
) -> AlwaysValidResult:
    """One look: fold ``difference`` into ``previous`` (None for the first look).

    Raises ``ValueError`` for a bad ``tau``/``alpha``, a negative variance, or a ``previous``
    made with other parameters.
    """
    _check_tau_alpha(tau, alpha)
    if not difference.variance >= 0.0:
        raise ValueError(f"variance must be >= 0, got {difference.variance!r}")
    if previous is not None and (previous.tau, previous.alpha, previous.null) != (tau, alpha, null):
        raise ValueError("previous look was made with another tau, alpha or null")
    llr = float(
        msprt_log_likelihood_ratio(difference.estimate, difference.variance, tau=tau, null=null)
    )
    p = math.exp(-max(llr, 0.0))
    radius = float(confidence_sequence_radius(difference.variance, tau=tau, alpha=alpha))
    lower, upper = difference.estimate - radius, difference.estimate + radius
    looks = 1
    if previous is not None:
        p = min(p, previous.p_value)
        lower, upper = max(lower, previous.lower), min(upper, previous.upper)
        looks = previous.looks + 1
    return AlwaysValidResult(
        looks=looks,
        estimate=difference.estimate,
        variance=difference.variance,
        p_value=p,
        lower=lower,
        upper=upper,
        tau=tau,
        alpha=alpha,
        null=null,
    )


# ---------------------------------------------------------------------------------------------
# Fixed horizon


@dataclass(frozen=True)
class FixedHorizonResult:
    """Welch's two-sided t-test and its (1 - alpha) confidence interval. Valid at one
    pre-planned look only."""

    estimate: float
    statistic: float
    df: float
    p_value: float
    lower: float
    upper: float
    alpha: float


def welch_p_values(
    control_mean: npt.ArrayLike,
    control_variance: npt.ArrayLike,
    control_count: npt.ArrayLike,
    treatment_mean: npt.ArrayLike,
    treatment_variance: npt.ArrayLike,
    treatment_count: npt.ArrayLike,
) -> FloatArray:
    """Two-sided Welch p-values from summary statistics (variances with ddof 1). Vectorized."""
    from scipy import stats  # here: seconds of import a coordinator need not pay at start-up
    result = stats.ttest_ind_from_stats(
        np.asarray(treatment_mean, dtype=np.float64),
        np.sqrt(np.asarray(treatment_variance, dtype=np.float64)),
        np.asarray(treatment_count, dtype=np.float64),
        np.asarray(control_mean, dtype=np.float64),
        np.sqrt(np.asarray(control_variance, dtype=np.float64)),
        np.asarray(control_count, dtype=np.float64),
        equal_var=False,
    )
    return np.asarray(result.pvalue, dtype=np.float64)


def welch_test(
    control: ArmStats, treatment: ArmStats, *, alpha: float = 0.05
) -> FixedHorizonResult:
    """Welch's t-test of treatment - control. Raises ``ValueError`` below two devices per arm
    or for an alpha outside (0, 1)."""
    from scipy import stats  # here: seconds of import a coordinator need not pay at start-up
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    diff = difference_in_means(control, treatment)
    vc = control.variance / control.count
    vt = treatment.variance / treatment.count
    se = math.sqrt(diff.variance)
    if se == 0.0:
        p = 1.0 if diff.estimate == 0.0 else 0.0
        return FixedHorizonResult(
            diff.estimate,
            math.copysign(math.inf, diff.estimate) if diff.estimate else 0.0,
            math.inf,
            p,
            diff.estimate,
            diff.estimate,
            alpha,
        )
    df = diff.variance**2 / (vc**2 / (control.count - 1) + vt**2 / (treatment.count - 1))
    statistic = diff.estimate / se
    p = float(2.0 * stats.t.sf(abs(statistic), df))
    half = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    return FixedHorizonResult(
        diff.estimate, statistic, df, p, diff.estimate - half, diff.estimate + half, alpha
    )


# ---------------------------------------------------------------------------------------------
# CUPED


def cuped_theta(y: npt.ArrayLike, x: npt.ArrayLike) -> float:
    """theta = cov(y, x) / var(x): the regression slope of y on the pre-period covariate x.
    0 when x is constant (nothing to remove). Raises ``ValueError`` for unequal lengths or
    fewer than two values."""
    ya = np.asarray(y, dtype=np.float64).ravel()
    xa = np.asarray(x, dtype=np.float64).ravel()
    if ya.shape != xa.shape or ya.size < 2:
        raise ValueError(f"y and x need equal lengths >= 2, got {ya.size} and {xa.size}")
    xc = xa - xa.mean()
    var_x = float(np.dot(xc, xc))
    if var_x == 0.0:
        return 0.0
    return float(np.dot(ya - ya.mean(), xc) / var_x)


def cuped_adjust(y: npt.ArrayLike, x: npt.ArrayLike, *, theta: float, x_mean: float) -> FloatArray:
    """y - theta (x - x_mean). Use the same ``theta`` and ``x_mean`` for every arm."""
    ya = np.asarray(y, dtype=np.float64)
    xa = np.asarray(x, dtype=np.float64)
    if ya.shape != xa.shape:
        raise ValueError(f"y and x shapes differ: {ya.shape} and {xa.shape}")
    return ya - theta * (xa - x_mean)


@dataclass(frozen=True)
class CupedArms:
    """Per-arm CUPED-adjusted values with the pooled ``theta`` and ``x_mean`` used."""

    theta: float
    x_mean: float
    adjusted: tuple[FloatArray, ...]


def cuped_arms(ys: Sequence[npt.ArrayLike], xs: Sequence[npt.ArrayLike]) -> CupedArms:
    """CUPED over arms: theta and mean(x) on all arms pooled, then each arm adjusted."""
    if len(ys) != len(xs):
        raise ValueError(f"{len(ys)} metric arrays for {len(xs)} covariate arrays")
    y_all = np.concatenate([np.asarray(y, dtype=np.float64).ravel() for y in ys])
    x_all = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in xs])
    theta = cuped_theta(y_all, x_all)
    x_mean = float(x_all.mean())
    adjusted = tuple(
        cuped_adjust(y, x, theta=theta, x_mean=x_mean) for y, x in zip(ys, xs, strict=True)
    )
    return CupedArms(theta, x_mean, adjusted)


@dataclass(frozen=True)
class PairedSums:
    """One arm's devices' sums of a metric ``y`` and its covariate ``x``: the count, sum(y),
    sum(y^2), sum(x), sum(x^2) and sum(x y). What a federated evaluation can release (sums
    add up across devices, under secure aggregation too), and all CUPED needs."""

    count: int
    y: float
    yy: float
    x: float
    xx: float
    xy: float

    def __add__(self, other: PairedSums) -> PairedSums:
        return PairedSums(self.count + other.count, self.y + other.y, self.yy + other.yy,
                          self.x + other.x, self.xx + other.xx, self.xy + other.xy)

    @classmethod
    def from_values(cls, y: npt.ArrayLike, x: npt.ArrayLike) -> PairedSums:
        ya = np.asarray(y, dtype=np.float64).ravel()
        xa = np.asarray(x, dtype=np.float64).ravel()
        if ya.shape != xa.shape:
            raise ValueError(f"y and x need equal lengths, got {ya.size} and {xa.size}")
        return cls(int(ya.size), float(ya.sum()), float(ya @ ya), float(xa.sum()),
                   float(xa @ xa), float(xa @ ya))


@dataclass(frozen=True)
class CupedSums:
    """CUPED from sums: the pooled ``theta`` and ``x_mean``, and per arm the statistics of
    its adjusted values (equal to :func:`cuped_arms` on the devices' values)."""

    theta: float
    x_mean: float
    arms: tuple[ArmStats, ...]


def cuped_from_sums(arms: Sequence[PairedSums]) -> CupedSums:
    """:func:`cuped_arms` computed from each arm's :class:`PairedSums` instead of its
    devices' values: theta = cov(y, x) / var(x) and mean(x) over the arms pooled (0 and the
    mean when x is constant), then per arm, with a = y - theta (x - x_mean),

        sum(a)   = sum(y) - theta (sum(x) - n x_mean)
        sum(a^2) = sum(y^2) - 2 theta (sum(xy) - x_mean sum(y))
                   + theta^2 (sum(x^2) - 2 x_mean sum(x) + n x_mean^2)

    Raises ``ValueError`` with fewer than two devices in all."""
    total = PairedSums(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    for arm in arms:
        total = total + arm
    n = total.count
    if n < 2:
        raise ValueError(f"CUPED needs at least two devices, got {n}")
    x_mean = total.x / n
    sxx = total.xx - n * x_mean * x_mean
    sxy = total.xy - x_mean * total.y
    theta = sxy / sxx if sxx > 1e-12 * max(1.0, abs(total.xx)) else 0.0
    out = []
    for arm in arms:
        k = arm.count
        adj_sum = arm.y - theta * (arm.x - k * x_mean)
        adj_squares = (arm.yy - 2 * theta * (arm.xy - x_mean * arm.y)
                       + theta * theta * (arm.xx - 2 * x_mean * arm.x + k * x_mean * x_mean))
        out.append(ArmStats.from_sums(k, adj_sum, adj_squares))
    return CupedSums(theta, x_mean, tuple(out))
