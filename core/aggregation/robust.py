"""Robust aggregation: rules that combine a round's updates so that a minority of poisoned
ones cannot steer the model, as pure functions over a stack of flat updates.

``updates`` is a ``[n, d]`` array (one flat update per row, any float dtype; arithmetic in
float64) and ``weights`` the devices' (capped) example counts. One entry point,
:func:`robust_aggregate`, applies a task's :class:`~core.types.RobustAggregation` and says
which devices the result kept (for metrics; never which were dropped to a device).

=============  ================================================================  ========
rule           what it computes                                                  weights
=============  ================================================================  ========
mean           example-weighted FedAvg                                           used
median         coordinate-wise median                                            ignored
trimmed_mean   per coordinate, drop the ``floor(trim_fraction n)`` lowest and    used
               highest values, weighted mean of the rest (trim 0: the mean)
krum           Blanchard et al. 2017: the one update whose summed squared        ignored
               distance to its ``n - f - 2`` nearest others is smallest
multi_krum     weighted mean of the ``m`` updates with the best Krum scores       used
               (``m`` default ``n - f``)
norm_bound     every update scaled to L2 norm at most B, then the weighted mean;  used
               B fixed, or ``norm_multiplier x`` the round's median update norm
=============  ================================================================  ========

What they cost and assume:

* every rule but ``mean`` and ``norm_bound`` needs all updates at once: memory
  ``O(n x d)``; Krum's pairwise distances are one ``n x n`` Gram product (``O(n^2 d)`` time);
* median and Krum ignore example counts: a device's vote is one vote, so a heavy honest
  device counts no more than a light one (the price of not letting a claimed count buy
  influence);
* Krum and multi-Krum tolerate ``f`` Byzantine devices only when ``n >= 2f + 3``; fewer
  updates raise :class:`RobustAggregationError` rather than silently giving no guarantee;
* none of them is a defence against attackers that stay close to the honest updates
  (e.g. a small, well-hidden backdoor); norm bounding limits, not removes, their influence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from core.errors import CoreError
from core.types import RobustAggregation, RobustKind

Updates = npt.NDArray[np.floating]


class RobustAggregationError(CoreError):
    """The round's updates cannot be combined by the task's rule (too few for the assumed
    number of Byzantine devices); the message names the field of ``aggregation.robust``."""


@dataclass(frozen=True)
class RobustResult:
    """A round's combined update (float64, ``[d]``), which rows contributed to it
    (``kept[i]``), and metrics that reveal no single device (counts and the bound)."""

    mean: npt.NDArray[np.float64]
    kept: npt.NDArray[np.bool_]
    metrics: dict[str, float] = field(default_factory=dict)


def _stack(updates: Updates | Sequence[npt.NDArray[np.floating]]) -> npt.NDArray[np.float64]:
    stack = np.asarray(updates, dtype=np.float64)
    if stack.ndim != 2 or stack.shape[0] == 0:
        raise ValueError(f"need a [devices, parameters] stack with a device, got shape "
                         f"{stack.shape}")
    return stack


def _weights(weights: Sequence[float] | npt.NDArray[np.floating], n: int
             ) -> npt.NDArray[np.float64]:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n:
        raise ValueError(f"need one weight per update: {n} updates, {w.size} weights")
    if not (np.isfinite(w).all() and (w > 0).all()):
        raise ValueError("every weight must be positive and finite")
    return w


def weighted_mean(updates: Updates, weights: Sequence[float] | npt.NDArray[np.floating]
                  ) -> npt.NDArray[np.float64]:
    """``sum_i w_i u_i / sum_i w_i``."""
    stack = _stack(updates)
    w = _weights(weights, stack.shape[0])
    return np.asarray(w @ stack / w.sum(), dtype=np.float64)


def coordinate_median(updates: Updates) -> npt.NDArray[np.float64]:
    """The coordinate-wise median (unweighted; the mean of the two middle values when ``n``
    is even). Unchanged by any minority of outliers, however large."""
    return np.asarray(np.median(_stack(updates), axis=0), dtype=np.float64)


def trimmed_mean(updates: Updates, weights: Sequence[float] | npt.NDArray[np.floating], *,
                 trim_fraction: float) -> npt.NDArray[np.float64]:
    """Per coordinate: drop the ``k = floor(trim_fraction n)`` lowest and ``k`` highest
    values, the weighted mean of the rest (each value keeps its device's weight). With
    ``trim_fraction = 0`` it is the weighted mean.

    Raises:
        ValueError: ``trim_fraction`` outside ``[0, 0.5)``.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    stack = _stack(updates)
    n = stack.shape[0]
    w = _weights(weights, n)
    k = math.floor(trim_fraction * n)
    if k == 0:
        return weighted_mean(stack, w)
    order = np.argsort(stack, axis=0, kind="stable")[k:n - k]
    values = np.take_along_axis(stack, order, axis=0)
    kept_w = w[order]
    return np.asarray((values * kept_w).sum(axis=0) / kept_w.sum(axis=0), dtype=np.float64)


def krum_scores(updates: Updates, *, byzantine: int) -> npt.NDArray[np.float64]:
    """Each update's Krum score (Blanchard et al. 2017): the sum of its squared L2
    distances to its ``n - f - 2`` nearest other updates.

    Raises:
        RobustAggregationError: ``n < 2f + 3`` (Krum's guarantee needs ``n > 2f + 2``).
        ValueError: ``byzantine`` is negative.
    """
    if byzantine < 0:
        raise ValueError(f"byzantine must be >= 0, got {byzantine}")
    stack = _stack(updates)
    n = stack.shape[0]
    if n < 2 * byzantine + 3:
        raise RobustAggregationError(
            f"aggregation.robust.byzantine: Krum tolerates f={byzantine} Byzantine devices "
            f"only with at least 2f + 3 = {2 * byzantine + 3} updates; this round has {n}")
    sq = np.einsum("ij,ij->i", stack, stack)
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b; rounding can make it slightly negative.
    distances = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (stack @ stack.T), 0.0)
    np.fill_diagonal(distances, np.inf)
    nearest = n - byzantine - 2
    closest = np.partition(distances, nearest - 1, axis=1)[:, :nearest]
    return np.asarray(closest.sum(axis=1), dtype=np.float64)


def krum(updates: Updates, *, byzantine: int) -> int:
    """The index of the update Krum selects (ties: the lowest index)."""
    return int(np.argmin(krum_scores(updates, byzantine=byzantine)))


def multi_krum(updates: Updates, weights: Sequence[float] | npt.NDArray[np.floating], *,
               byzantine: int, m: int | None = None
               ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The weighted mean of the ``m`` updates with the lowest Krum scores (default
    ``n - f``), and which were kept.

    Raises:
        RobustAggregationError: too few updates for ``byzantine``, or ``m`` above ``n``.
    """
    stack = _stack(updates)
    n = stack.shape[0]
    scores = krum_scores(stack, byzantine=byzantine)
    count = n - byzantine if m is None else m
    if not 1 <= count <= n:
        raise RobustAggregationError(
            f"aggregation.robust.multi_krum_m: must be between 1 and the round's {n} "
            f"updates, got {count}")
    kept = np.zeros(n, dtype=bool)
    kept[np.argsort(scores, kind="stable")[:count]] = True
    w = _weights(weights, n)
    return weighted_mean(stack[kept], w[kept]), kept


def norm_bounded_mean(updates: Updates, weights: Sequence[float] | npt.NDArray[np.floating],
                      *, bound: float | None, norm_multiplier: float = 2.0
                      ) -> tuple[npt.NDArray[np.float64], float, int]:
    """Every update scaled by ``min(1, B / ||u||)``, then the weighted mean; ``B`` is
    ``bound``, or (``bound`` None) ``norm_multiplier`` times the median update norm of the
    round (adaptive: it follows the honest majority's scale as training converges).
    Returns (mean, B, how many updates were scaled down).

    Raises:
        ValueError: a bound or multiplier that is not positive and finite.
    """
    stack = _stack(updates)
    norms = np.linalg.norm(stack, axis=1)
    if bound is None:
        if not (math.isfinite(norm_multiplier) and norm_multiplier > 0):
            raise ValueError(f"norm_multiplier must be positive, got {norm_multiplier}")
        limit = float(norm_multiplier * np.median(norms))
    else:
        limit = float(bound)
        if not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"norm bound must be positive and finite, got {bound}")
    over = norms > limit
    scale = np.ones_like(norms)
    scale[over] = limit / norms[over]
    return weighted_mean(stack * scale[:, None], weights), limit, int(over.sum())


def check_rule_applies(rule: RobustAggregation, *, secure: bool, central_dp: bool) -> None:
    """Refuses a rule the round cannot apply soundly; one check for the coordinator and the
    simulator.

    * secure aggregation: the server only ever sees the masked sum, never one update, so
      only a fixed ``norm_bound`` applies (each device clips to it before masking); an
      adaptive bound would need every device's norm in the clear;
    * central DP: the noise is calibrated to one device's clipped contribution; a fixed
      ``norm_bound`` keeps each contribution within it (each device's own scaling), but
      the other rules make a device's influence depend on the others' updates (which one
      Krum keeps, which values a median takes), which the sensitivity analysis does not
      cover, and an adaptive bound moves with the other devices' norms.

    Raises:
        RobustAggregationError: naming ``aggregation.robust.kind`` (or ``norm_bound``) and
            why.
    """
    if rule.kind is RobustKind.MEAN:
        return
    setting = "secure aggregation" if secure else "central DP" if central_dp else None
    if setting is None:
        return
    if rule.kind is not RobustKind.NORM_BOUND:
        why = ("the server only sees the masked sum, never one update" if secure else
               "the DP analysis bounds one device's contribution to a sum, and "
               f"{rule.kind.value} makes it depend on the other devices' updates")
        raise RobustAggregationError(
            f"aggregation.robust.kind: {rule.kind.value!r} cannot run under {setting}: "
            f"{why}; use 'norm_bound' with a fixed bound, or 'mean'")
    if rule.norm_bound is None:
        why = ("the median norm needs every device's norm in the clear" if secure else
               "a bound taken from the round's median norm moves with the other devices' "
               "updates")
        raise RobustAggregationError(
            f"aggregation.robust.norm_bound: adaptive (auto) cannot run under {setting}: "
            f"{why}; set a fixed bound")


def robust_aggregate(updates: Updates, weights: Sequence[float] | npt.NDArray[np.floating],
                     rule: RobustAggregation) -> RobustResult:
    """Combines a round's updates by ``rule`` (see the module table).

    Metrics: ``robust_kept`` (updates that contributed; coordinate-wise rules count all),
    and for norm_bound ``robust_norm_bound`` and ``robust_clipped``.

    Raises:
        RobustAggregationError: the round has too few updates for the rule's ``byzantine``
            (Krum, multi-Krum) or ``multi_krum_m``.
        ValueError: an empty stack, or weights that do not match it.
    """
    stack = _stack(updates)
    n = stack.shape[0]
    w = _weights(weights, n)
    everyone = np.ones(n, dtype=bool)
    kind = rule.kind
    metrics: dict[str, float] = {}
    if kind is RobustKind.MEAN:
        mean, kept = weighted_mean(stack, w), everyone
    elif kind is RobustKind.MEDIAN:
        mean, kept = coordinate_median(stack), everyone
    elif kind is RobustKind.TRIMMED_MEAN:
        mean, kept = trimmed_mean(stack, w, trim_fraction=rule.trim_fraction), everyone
    elif kind is RobustKind.KRUM:
        chosen = krum(stack, byzantine=rule.byzantine)
        kept = np.zeros(n, dtype=bool)
        kept[chosen] = True
        mean = stack[chosen].copy()
    elif kind is RobustKind.MULTI_KRUM:
        mean, kept = multi_krum(stack, w, byzantine=rule.byzantine, m=rule.multi_krum_m)
    elif kind is RobustKind.NORM_BOUND:
        mean, limit, clipped = norm_bounded_mean(stack, w, bound=rule.norm_bound,
                                                 norm_multiplier=rule.norm_multiplier)
        kept = everyone
        metrics = {"robust_norm_bound": limit, "robust_clipped": float(clipped)}
    else:  # pragma: no cover - every kind is handled above
        raise AssertionError(kind)
    metrics["robust_kept"] = float(kept.sum())
    return RobustResult(mean, kept, metrics)


__all__ = [
    "RobustAggregationError",
    "RobustResult",
    "check_rule_applies",
    "coordinate_median",
    "krum",
    "krum_scores",
    "multi_krum",
    "norm_bounded_mean",
    "robust_aggregate",
    "trimmed_mean",
    "weighted_mean",
]
