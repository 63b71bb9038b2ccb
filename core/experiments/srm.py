"""Sample-ratio mismatch (SRM): do the arms hold the shares of devices the split promised?

A chi-square goodness-of-fit test of the devices counted per arm against ``total x weight``
(:func:`scipy.stats.chisquare`). A tiny p-value means the assignment or the reporting is
broken (one arm's devices crash, drop reports, or are filtered differently), and every
comparison between the arms is suspect, whatever its p-value. The default threshold 0.001 is
the usual one: the check runs every round, so it must rarely fire on a healthy experiment.

Count *devices* (the unit of assignment), not reports: a device that reports ten times is
one draw from the split. With per-stratum splits, check each stratum on its own and combine
them (:func:`stratified_srm_check`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.experiments.spec import DEFAULT_SRM_THRESHOLD

__all__ = ["DEFAULT_SRM_THRESHOLD", "SrmResult", "srm_check", "stratified_srm_check"]


@dataclass(frozen=True)
class SrmResult:
    """``flagged`` is ``p_value < threshold``. ``expected`` is total x weight per arm."""

    observed: tuple[int, ...]
    expected: tuple[float, ...]
    statistic: float
    p_value: float
    threshold: float
    flagged: bool

    def describe(self) -> str:
        shares = ", ".join(
            f"{o} observed vs {e:.1f} expected"
            for o, e in zip(self.observed, self.expected, strict=True)
        )
        verdict = "sample ratio mismatch" if self.flagged else "no sample ratio mismatch"
        return f"{verdict}: chi2={self.statistic:.2f}, p={self.p_value:.3g} ({shares})"


def srm_check(
    counts: Sequence[int],
    weights: Sequence[float],
    *,
    threshold: float = DEFAULT_SRM_THRESHOLD,
) -> SrmResult:
    """Chi-square test of ``counts`` (devices per arm) against the split ``weights``.

    Arms with weight 0 must have no devices: any device there is a certain mismatch
    (p = 0). With no devices at all there is nothing to test (p = 1, not flagged).
    Raises ``ValueError`` for mismatched lengths, negative counts, weights that are not a
    distribution, or a threshold outside (0, 1).
    """
    from scipy import stats  # here: seconds of import a coordinator need not pay at start-up
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if len(counts) != len(weights):
        raise ValueError(f"{len(counts)} counts for {len(weights)} weights")
    observed = np.asarray(counts, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if np.any(observed < 0):
        raise ValueError(f"counts must be >= 0, got {list(counts)}")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or abs(math.fsum(w.tolist()) - 1.0) > 1e-9:
        raise ValueError(f"weights must be >= 0 and sum to 1, got {list(weights)}")
    total = int(observed.sum())
    expected = total * w
    positive = w > 0
    if total == 0:
        statistic, p_value = 0.0, 1.0
    elif np.any(observed[~positive] > 0):
        statistic, p_value = math.inf, 0.0
    elif int(positive.sum()) < 2:
        statistic, p_value = 0.0, 1.0
    else:
        result = stats.chisquare(observed[positive], f_exp=expected[positive])
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return _result(observed, expected, statistic, p_value, threshold)


def stratified_srm_check(
    counts: Mapping[str, Sequence[int]],
    weights: Mapping[str, Sequence[float]],
    *,
    threshold: float = DEFAULT_SRM_THRESHOLD,
) -> SrmResult:
    """The sample-ratio check of an experiment whose split differs between strata.

    ``counts[s]``: devices per arm seen in stratum ``s``; ``weights[s]``: that stratum's
    split. Each stratum's devices are an independent multinomial draw from its own split, so
    the per-stratum chi-square statistics add up, and so do their degrees of freedom (the
    arms of positive weight, less one, per stratum): one test of all strata at once, which
    also catches a mismatch that pooled counts would hide (two strata skewed in opposite
    directions). A device in an arm of weight 0 of its stratum is a certain mismatch
    (p = 0). The result's ``observed`` and ``expected`` are pooled over the strata
    (expected: the sum of each stratum's count x its weights), for display.

    Raises ``ValueError`` for a stratum without weights, mismatched lengths, negative counts,
    weights that are not a distribution, or a threshold outside (0, 1).
    """
    from scipy import stats

    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    arms = len(next(iter(weights.values()))) if weights else 0
    observed = np.zeros(arms, dtype=np.int64)
    expected = np.zeros(arms, dtype=np.float64)
    statistic, dof, certain = 0.0, 0, False
    for name, stratum_counts in counts.items():
        if name not in weights:
            raise ValueError(f"stratum {name!r} has counts but no split")
        if len(stratum_counts) != arms or len(weights[name]) != arms:
            raise ValueError(f"stratum {name!r}: {len(stratum_counts)} counts for "
                             f"{len(weights[name])} weights ({arms} arms)")
        one = srm_check(stratum_counts, weights[name], threshold=threshold)
        observed += np.asarray(one.observed, dtype=np.int64)
        expected += np.asarray(one.expected, dtype=np.float64)
        if one.p_value == 0.0 and math.isinf(one.statistic):
            certain = True
            continue
        positive = sum(1 for w in weights[name] if w > 0)
        if sum(one.observed) and positive >= 2:
            statistic += one.statistic
            dof += positive - 1
    if certain:
        statistic, p_value = math.inf, 0.0
    elif dof == 0:
        p_value = 1.0
    else:
        p_value = float(stats.chi2.sf(statistic, dof))
    return _result(observed, expected, statistic, p_value, threshold)


def _result(observed: np.ndarray, expected: np.ndarray, statistic: float, p_value: float,
            threshold: float) -> SrmResult:
    return SrmResult(
        observed=tuple(int(c) for c in observed),
        expected=tuple(float(e) for e in expected),
        statistic=statistic,
        p_value=p_value,
        threshold=threshold,
        flagged=p_value < threshold,
    )
