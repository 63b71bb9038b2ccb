"""One device's evaluation report: its results per model version -> the layout's vector
(:mod:`core.evaluation.layout`), and the coordinator's check of a clear report.

A device's value of each metric is clamped to the metric's range and its example count to
``max_examples`` *before* anything is summed: those are the bounds on one device's influence
(and the sensitivity of the DP release). The coordinator refuses a clear report that breaks
them or is not internally consistent (``wsum`` must be ``examples x sum``, a histogram must be
the one-hot bin of the value, ...), so a device can move a sum only as far as an honest
device with other data could.

Where the plan sketches per-example values (``plan.sketch``: clear reports only), a device
clamps each example's value to the metric's range, keeps ``n`` of them (all when it has at
most ``max_examples``; else the values at evenly spaced ranks, so each device weighs
``n`` examples in the pooled distribution, as in the example-weighted mean) and writes the
KLL sketch of those into its block. The coordinator checks that sketch's structure for
``n`` values, the order of each level and the range of every item
(:func:`core.evaluation.kll.items_problem`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as data_field

import numpy as np
import numpy.typing as npt

from core.evaluation import kll
from core.evaluation.layout import COVARIATE_FIELDS, EvaluationLayout
from core.evaluation.plan import MetricPlan
from core.evaluation.sketch import one_hot
from core.secagg.encoding import Encoded, encode_update
from core.secagg.params import SecAggParams

#: Relative tolerance of the consistency checks (reports travel as float32).
_REL_TOL = 1e-5


@dataclass(frozen=True)
class DeviceResult:
    """A device's evaluation of one model version: examples evaluated and the value of every
    metric of the plan (mean per example for loss, the fraction correct for accuracy);
    ``per_example``: each example's value of the metrics the plan sketches."""

    examples: int
    values: Mapping[str, float]
    per_example: Mapping[str, npt.NDArray[np.floating]] = data_field(default_factory=dict)


def capped_values(values: npt.ArrayLike, n: int) -> npt.NDArray[np.float64]:
    """``values`` when there are at most ``n``; else the ``n`` at ranks ``(i + 1/2) N / n``
    of the sorted values (a quantile-preserving subsample: each is within ``1/n`` of the
    rank it stands for). Raises ValueError for n < 1."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if v.size <= n:
        return v
    return v[((np.arange(n) + 0.5) * v.size / n).astype(np.int64)]


def device_vector(layout: EvaluationLayout, results: Mapping[int, DeviceResult], *,
                  rng: np.random.Generator | None = None) -> npt.NDArray[np.float64]:
    """The report of a device with ``results`` for every version of the plan; in an
    experiment (``plan.assignment``), for exactly one version (its arm's), the blocks of the
    others left zero: the summed reports then count each arm's devices apart. With a
    covariate version (``plan.assignment.covariate``) the device also has its result for
    that version (the same one, in its arm), which fills the ``cov_*`` fields of its arm's
    block. Where the plan sketches a metric, each filled block also holds the sketch of
    the version's ``per_example`` values (``rng``: the sketch's coins; fresh when None).

    Raises:
        ValueError: a version or a metric of the plan is missing, a value is NaN, or no
            example was evaluated (the message names which).
    """
    out = _scalar_vector(layout, results)
    rng = np.random.default_rng() if rng is None else rng
    for version in layout.plan.versions:
        if out[layout.index(version, "", "devices")] == 0.0:
            continue
        n = int(out[layout.index(version, "", "examples")])
        for m in layout.sketched:
            raw = results[version].per_example.get(m.name)
            if raw is None or np.size(raw) == 0:
                raise ValueError(f"model version {version}: no per-example values of metric "
                                 f"{m.name!r} to sketch")
            values = np.asarray(raw, dtype=np.float64)
            if np.isnan(values).any():
                raise ValueError(f"model version {version}: a per-example value of metric "
                                 f"{m.name!r} is NaN")
            # Clamped, then rounded as the report will be (float32), so the coordinator sees
            # exactly these items, sorted and in range.
            clamped = np.clip(capped_values(values, n), m.low, m.high).astype(np.float32)
            sketch = kll.build(clamped, k=_sketch_k(layout), rng=rng)
            out[layout.sketch_slice(version, m)] = kll.to_items(sketch, layout.sketch_length)
    return out


def _sketch_k(layout: EvaluationLayout) -> int:
    assert layout.plan.sketch is not None
    return layout.plan.sketch.k


def _scalar_vector(layout: EvaluationLayout, results: Mapping[int, DeviceResult]
                   ) -> npt.NDArray[np.float64]:
    """:func:`device_vector` without the sketch regions (left zero)."""
    plan = layout.plan
    out = np.zeros(layout.length, dtype=np.float64)
    versions = plan.versions
    covariate = plan.assignment.covariate if plan.assignment is not None else None
    if plan.assignment is not None:
        # Its arm's version; a device in the covariate's own arm has only that one.
        own = [v for v in plan.versions if v in results and v != covariate] or [
            v for v in plan.versions if v in results]
        if len(own) != 1 or set(results) != {own[0]} | (
                set() if covariate is None else {covariate}):
            raise ValueError(f"in an experiment a device evaluates one version of "
                             f"{list(plan.versions)}"
                             + ("" if covariate is None else
                                f" and the covariate version {covariate}")
                             + f", got results for {sorted(results)}")
        versions = (own[0],)
    for version in versions:
        result = results.get(version)
        if result is None:
            raise ValueError(f"no result for model version {version}")
        if result.examples < 1:
            raise ValueError(f"model version {version} was evaluated on no example")
        n = float(min(result.examples, plan.max_examples))
        out[layout.index(version, "", "devices")] = 1.0
        out[layout.index(version, "", "examples")] = n
        out[layout.index(version, "", "examples_sq")] = n * n
        for m in plan.metrics:
            x = _clamped(result, version, m)
            for field, value in (("wsum", n * x), ("w2sum", n * n * x), ("w2sq", n * n * x * x),
                                 ("sum", x), ("sq", x * x)):
                out[layout.index(version, m.name, field)] = value
            if m.bins:
                out[layout.histogram_slice(version, m)] = one_hot(
                    x, low=m.hist_low, high=m.hist_high, bins=m.bins)
            if covariate is not None:
                c = _clamped(results[covariate], covariate, m)
                for field, value in zip(COVARIATE_FIELDS, (c, c * c, c * x), strict=True):
                    out[layout.index(version, m.name, field)] = value
    return out


def _clamped(result: DeviceResult, version: int, m: MetricPlan) -> float:
    if m.name not in result.values:
        raise ValueError(f"model version {version}: no value of metric {m.name!r}")
    raw = float(result.values[m.name])
    if math.isnan(raw):  # an infinite loss is clamped like any value out of range
        raise ValueError(f"model version {version}: metric {m.name!r} is NaN")
    return min(max(raw, m.low), m.high)


def report_problem(layout: EvaluationLayout, vector: npt.NDArray[np.floating], *,
                   device_id: str | None = None, stratum: str | None = None) -> str | None:
    """Why a clear report must be refused (a message for the device), or None.

    The report is rebuilt from its own ``examples`` and ``sum`` coordinates with
    :func:`device_vector` and must equal it, within float32 rounding: so every bound and
    every relation between the coordinates holds. In an experiment exactly one version's
    block is filled, and with ``device_id`` it must be that device's arm's version (under
    the split of the ``stratum`` it declared at check-in: a device cannot choose its arm). Each sketch region must hold a sketch of the block's ``n``
    values (all zero in a block not filled)."""
    v = np.asarray(vector, dtype=np.float64)
    if v.shape != (layout.length,):
        return f"the report has {v.size} values; this task's layout has {layout.length}"
    if not np.isfinite(v).all():
        return "the report holds NaN or infinite values"
    plan = layout.plan
    versions = plan.versions
    if plan.assignment is not None:
        versions = tuple(ver for ver in plan.versions
                         if v[layout.index(ver, "", "devices")] != 0.0)
        if len(versions) != 1:
            return (f"in this experiment a device reports exactly one model version (its "
                    f"arm's); this report fills {len(versions)} of {list(plan.versions)}")
        if device_id is not None and versions[0] != plan.version_for(device_id, stratum):
            return (f"device {device_id[:64]!r} is assigned model version "
                    f"{plan.version_for(device_id, stratum)} in this experiment, not "
                    f"{versions[0]}")
    results = {}
    for version in versions:
        if v[layout.index(version, "", "devices")] != 1.0:
            return f"model version {version}: the 'devices' value must be 1"
        n = v[layout.index(version, "", "examples")]
        if not (1 <= n <= plan.max_examples and float(n).is_integer()):
            return (f"model version {version}: 'examples' must be a whole number between 1 "
                    f"and max_examples ({plan.max_examples}), got {n:g}")
        values = {}
        for m in plan.metrics:
            x = v[layout.index(version, m.name, "sum")]
            if not m.low <= x <= m.high:
                return (f"model version {version}: metric {m.name!r} is {x:g}, outside its "
                        f"range [{m.low:g}, {m.high:g}]")
            values[m.name] = float(x)
        results[version] = DeviceResult(int(n), values)
        covariate = plan.assignment.covariate if plan.assignment is not None else None
        if covariate is not None and covariate != version:
            cov_values = {}
            for m in plan.metrics:
                c = v[layout.index(version, m.name, "cov_sum")]
                if not m.low <= c <= m.high:
                    return (f"model version {version}: the covariate of metric {m.name!r} is "
                            f"{c:g}, outside its range [{m.low:g}, {m.high:g}]")
                cov_values[m.name] = float(c)
            results[covariate] = DeviceResult(int(n), cov_values)
    for version in plan.versions:
        # Filled blocks' counts were checked above; others must hold empty sketches.
        n = int(v[layout.index(version, "", "examples")]) if version in versions else 0
        for m in layout.sketched:
            problem = kll.items_problem(
                v[layout.sketch_slice(version, m)], n, k=_sketch_k(layout),
                low=float(np.float32(m.low)), high=float(np.float32(m.high)))
            if problem is not None:
                return f"model version {version}: the sketch of metric {m.name!r}: {problem}"
    expected = _scalar_vector(layout, results)
    tolerance = _REL_TOL * layout.bounds + 1e-12
    bad = np.flatnonzero((np.abs(v - expected) > tolerance) & ~layout.sketch_mask)
    if bad.size:
        c = layout.coordinates[int(bad[0])]
        what = f"{c.metric}.{c.field}" if c.metric else c.field
        return (f"model version {c.version}: '{what}' is {v[bad[0]]:.6g}, but the report's "
                f"own examples and values make it {expected[bad[0]]:.6g}")
    return None


def report_scale(layout: EvaluationLayout, *, secagg_clip: float | None,
                 dp_l2_clip_norm: float | None) -> float:
    """The factor a unit report (:meth:`EvaluationLayout.to_unit`) is multiplied by before it
    is summed under secure aggregation and/or central DP, the same on devices and the
    coordinator: inside the quantizer's [-clip, clip] (secure aggregation), and to an L2 norm
    of at most the DP clip norm (so the DP sum's sensitivity is the clip norm, and nothing is
    ever clipped). 1 when neither applies."""
    scale = math.inf
    if secagg_clip is not None:
        scale = secagg_clip
    if dp_l2_clip_norm is not None:
        scale = min(scale, dp_l2_clip_norm / layout.unit_l2_bound)
    return 1.0 if math.isinf(scale) else scale


def encode_masked_report(layout: EvaluationLayout, vector: npt.NDArray[np.floating],
                         params: SecAggParams, *, dp_l2_clip_norm: float | None,
                         rng: np.random.Generator) -> Encoded:
    """A device's report as its secure-aggregation input: unit-scaled, times
    :func:`report_scale`, quantized, with the weight cap as its weight (every report weighs
    the same; the coordinator's sum is the plain sum)."""
    scale = report_scale(layout, secagg_clip=params.clip, dp_l2_clip_norm=dp_l2_clip_norm)
    return encode_update(layout.to_unit(vector) * scale, params.weight_cap, params, rng)
