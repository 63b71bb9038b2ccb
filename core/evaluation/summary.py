"""From a round's summed reports to what an evaluation releases: per model version the
device count, the example count, and per metric the example-weighted and device-weighted
means with standard errors, (metrics with a histogram) quantiles of the devices' values and
the histogram, and (metrics the plan sketches, clear reports only) quantiles of the pooled
per-example values from the merged KLL sketches, with their rank-error bound.

Standard errors treat devices as the sampled units (examples on one device are not
independent draws):

* device-weighted mean ``D = sum(x) / K``: ``SE^2 = s^2 / K`` with
  ``s^2 = (sum(x^2) - K D^2) / (K - 1)``;
* example-weighted mean ``A = sum(n x) / N`` (a ratio estimator, N = sum(n)): the
  cluster-robust (linearized) variance ``SE^2 = K / (K - 1) * sum(n^2 (x - A)^2) / N^2``,
  where ``sum(n^2 (x - A)^2) = sum(n^2 x^2) - 2 A sum(n^2 x) + A^2 sum(n^2)``.

Both need K >= 2; with fewer devices (or a non-positive noisy count under DP) the SE is NaN
and not released. Under secure aggregation and DP the sums carry quantization error or noise;
:mod:`core.evaluation.bounds` bounds the former; the SEs here do not include the DP noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from core.evaluation import kll
from core.evaluation.layout import EvaluationLayout
from core.evaluation.sketch import quantiles as histogram_quantiles

#: Every released round metric of an evaluation starts with this.
PREFIX = "eval"


@dataclass(frozen=True)
class MetricSummary:
    example_mean: float
    example_se: float
    device_mean: float
    device_se: float
    #: q -> value (metrics with a histogram); within one bin width for exact counts.
    quantiles: Mapping[float, float] = field(default_factory=dict)
    histogram: tuple[float, ...] = ()
    #: q -> value of the pooled per-example values (metrics the plan sketches): the true
    #: normalized rank of each is within ``example_rank_error`` of q, with 99% confidence.
    example_quantiles: Mapping[float, float] = field(default_factory=dict)
    example_rank_error: float = math.nan


@dataclass(frozen=True)
class VersionSummary:
    """``covariate``: per metric, the sums of the arm's devices' covariate values c:
    (sum(c), sum(c^2), sum(c x)) (an experiment with a CUPED covariate only)."""

    version: int
    devices: float
    examples: float
    metrics: Mapping[str, MetricSummary]
    covariate: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)


def summarize(layout: EvaluationLayout, sums: npt.NDArray[np.floating],
              quantiles: Sequence[float], *,
              sketches: Mapping[tuple[int, str], kll.KllSketch] | None = None
              ) -> list[VersionSummary]:
    """The summaries of every version from the summed report vectors (their sketch regions
    are not read) and, keyed by (version, metric), the merged sketches of the devices'
    per-example values (clear reports of a plan with sketches)."""
    s = np.asarray(sums, dtype=np.float64)
    if s.shape != (layout.length,):
        raise ValueError(f"sums have {s.size} values, the layout {layout.length}")
    out = []
    for version in layout.plan.versions:
        def get(metric: str, name: str, v: int = version) -> float:
            return float(s[layout.index(v, metric, name)])

        k, n, n2 = get("", "devices"), get("", "examples"), get("", "examples_sq")
        metrics = {}
        for m in layout.plan.metrics:
            wsum, w2sum, w2sq = get(m.name, "wsum"), get(m.name, "w2sum"), get(m.name, "w2sq")
            total, sq = get(m.name, "sum"), get(m.name, "sq")
            a = _ratio(wsum, n)
            d = _ratio(total, k)
            example_se = device_se = math.nan
            if k >= 2 and n > 0:
                spread = max(w2sq - 2 * a * w2sum + a * a * n2, 0.0)
                example_se = math.sqrt(k / (k - 1) * spread) / n
                device_se = math.sqrt(max(sq - k * d * d, 0.0) / (k - 1) / k)
            qs: dict[float, float] = {}
            hist: tuple[float, ...] = ()
            if m.bins:
                counts = s[layout.histogram_slice(version, m)]
                hist = tuple(float(c) for c in counts)
                qs = dict(zip(quantiles, histogram_quantiles(
                    counts, quantiles, low=m.hist_low, high=m.hist_high), strict=True))
            sketch = (sketches or {}).get((version, m.name))
            example_qs: dict[float, float] = {}
            rank_error = math.nan
            if sketch is not None and sketch.n > 0:
                example_qs = dict(zip(quantiles, kll.quantiles(sketch, quantiles), strict=True))
                rank_error = kll.rank_error_bound(sketch)
            metrics[m.name] = MetricSummary(a, example_se, d, device_se, qs, hist, example_qs,
                                            rank_error)
        covariate = ({m.name: (get(m.name, "cov_sum"), get(m.name, "cov_sq"),
                               get(m.name, "cov_cross")) for m in layout.plan.metrics}
                     if layout.has_covariate else {})
        out.append(VersionSummary(version, k, n, metrics, covariate))
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def quantile_key(q: float) -> str:
    """``q50`` for 0.5, ``q2.5`` for 0.025."""
    return "q" + f"{q * 100:.4f}".rstrip("0").rstrip(".")


def round_metrics(summaries: Sequence[VersionSummary]) -> dict[str, float]:
    """The summaries as flat round metrics, ``eval.v<version>.<metric>.<stat>``; NaN values
    (an SE of fewer than two devices) are left out. Stats: ``mean``, ``se``, ``device_mean``,
    ``device_se``, ``q<p>`` and ``bin<j>`` (the histogram of device values),
    ``example_q<p>`` and ``example_rank_error`` (the sketch of per-example values),
    ``cov_*`` (CUPED sums)."""
    out: dict[str, float] = {}
    for v in summaries:
        base = f"{PREFIX}.v{v.version}"
        out[f"{base}.devices"] = v.devices
        out[f"{base}.examples"] = v.examples
        for name, m in v.metrics.items():
            stats = {"mean": m.example_mean, "se": m.example_se,
                     "device_mean": m.device_mean, "device_se": m.device_se}
            stats.update({quantile_key(q): value for q, value in m.quantiles.items()})
            stats.update({f"bin{j}": c for j, c in enumerate(m.histogram)})
            stats.update({f"example_{quantile_key(q)}": value
                          for q, value in m.example_quantiles.items()})
            if m.example_quantiles:
                stats["example_rank_error"] = m.example_rank_error
            if name in v.covariate:
                stats.update(zip(("cov_sum", "cov_sq", "cov_cross"), v.covariate[name],
                                 strict=True))
            for stat, value in stats.items():
                if math.isfinite(value):
                    out[f"{base}.{name}.{stat}"] = value
    return out


_KEY = re.compile(rf"{PREFIX}\.v(\d+)\.(?:([A-Za-z][A-Za-z0-9_]*)\.)?([A-Za-z0-9_.]+)")


def results_table(metrics: Mapping[str, float]) -> dict[int, dict[str, dict[str, float]]]:
    """Round metrics back to ``{version: {metric or "": {stat: value}}}`` (for display);
    other metrics are ignored."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        match = _KEY.fullmatch(key)
        if match is None:
            continue
        version, metric, stat = int(match.group(1)), match.group(2) or "", match.group(3)
        out.setdefault(version, {}).setdefault(metric, {})[stat] = value
    return out
