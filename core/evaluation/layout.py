"""The fixed layout of an evaluation report: one float vector per device whose *sum* over
devices carries everything the summaries need, so it flows unchanged through clear uploads,
secure aggregation (only the sum is learned) and central DP (noise on the sum).

Per model version of the plan, one block::

    devices         1                       (sums to the device count K)
    examples        n                       (n = min(examples evaluated, max_examples))
    examples_sq     n^2
    per metric m (device value x, clamped to the metric's range):
      wsum          n x        -> example-weighted mean  sum(n x) / sum(n)
      w2sum         n^2 x      -> its standard error (devices as clusters, below)
      w2sq          n^2 x^2
      sum           x          -> device-weighted mean  sum(x) / K
      sq            x^2        -> its standard error
      bin0..binB-1  one-hot bin of x (metrics with a histogram) -> quantiles
      cov_sum       c          (an experiment with a CUPED covariate only: c is the
      cov_sq        c^2         device's value of the metric under the covariate version,
      cov_cross     c x         filled in its arm's block) -> CUPED from sums
      kll0..kllR-1  (reports in the clear only, metrics the plan sketches: ``plan.sketch``)
                    the items of a KLL sketch of the device's per-example values, zero-
                    padded (:mod:`core.evaluation.kll`); never summed: merged as sketches

Every coordinate has a bound on its magnitude (:attr:`EvaluationLayout.bounds`), so a
device's vector divided by the bounds (:meth:`to_unit`) has values in [-1, 1] and an L2 norm
at most :attr:`unit_l2_bound` (each histogram is one-hot: it adds at most 1 to the squared
norm, not its bin count): the sensitivity secure aggregation's quantizer and central DP's
noise are scaled to. (Plans with sketches are never scaled: their reports go in the clear.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.evaluation.kll import max_items
from core.evaluation.plan import EvaluationPlan, MetricPlan

#: The per-version fields before the metrics, and the per-metric scalar fields.
BLOCK_FIELDS = ("devices", "examples", "examples_sq")
METRIC_FIELDS = ("wsum", "w2sum", "w2sq", "sum", "sq")
#: Per metric, after the histogram, where the plan has a covariate version.
COVARIATE_FIELDS = ("cov_sum", "cov_sq", "cov_cross")
#: The upload's one tensor (float32) in an evaluation task.
TENSOR_NAME = "evaluation_report"


@dataclass(frozen=True)
class Coordinate:
    version: int
    metric: str  # "" for the block fields
    field: str   # one of BLOCK_FIELDS, METRIC_FIELDS, COVARIATE_FIELDS, "bin<j>", "kll<j>"


class EvaluationLayout:
    """Positions and bounds of a plan's report vector. Immutable; cheap to build."""

    def __init__(self, plan: EvaluationPlan) -> None:
        self.plan = plan
        cap = float(plan.max_examples)
        coords: list[Coordinate] = []
        bounds: list[float] = []
        histograms = 0
        covariate = plan.assignment is not None and plan.assignment.covariate is not None
        #: Whether blocks carry the :data:`COVARIATE_FIELDS`.
        self.has_covariate = covariate
        #: The length of each sketch region (0 without sketches).
        self.sketch_length = (max_items(plan.max_examples, plan.sketch.k)
                              if plan.sketch is not None else 0)
        for version in plan.versions:
            for name, bound in zip(BLOCK_FIELDS, (1.0, cap, cap * cap), strict=True):
                coords.append(Coordinate(version, "", name))
                bounds.append(bound)
            for m in plan.metrics:
                x = m.magnitude
                for name, bound in zip(METRIC_FIELDS,
                                       (cap * x, cap * cap * x, cap * cap * x * x, x, x * x),
                                       strict=True):
                    coords.append(Coordinate(version, m.name, name))
                    bounds.append(bound)
                for j in range(m.bins):
                    coords.append(Coordinate(version, m.name, f"bin{j}"))
                    bounds.append(1.0)
                histograms += 1 if m.bins else 0
                if covariate:
                    for name, bound in zip(COVARIATE_FIELDS, (x, x * x, x * x), strict=True):
                        coords.append(Coordinate(version, m.name, name))
                        bounds.append(bound)
                if plan.sketched(m.name):
                    for j in range(self.sketch_length):
                        coords.append(Coordinate(version, m.name, f"kll{j}"))
                        bounds.append(x)
        self.coordinates: tuple[Coordinate, ...] = tuple(coords)
        self.bounds: npt.NDArray[np.float64] = np.asarray(bounds, dtype=np.float64)
        self._index = {c: i for i, c in enumerate(coords)}
        #: True at the coordinates of sketch items (not sums: summaries never read them).
        self.sketch_mask = np.array([c.field.startswith("kll") for c in coords], dtype=bool)
        scalars = sum(1 for c in coords if not c.field.startswith(("bin", "kll")))
        #: The L2 norm of any device's :meth:`to_unit` vector is at most this.
        self.unit_l2_bound = math.sqrt(scalars + histograms)

    @property
    def length(self) -> int:
        return len(self.coordinates)

    def index(self, version: int, metric: str, field: str) -> int:
        return self._index[Coordinate(version, metric, field)]

    def histogram_slice(self, version: int, metric: MetricPlan) -> slice:
        start = self.index(version, metric.name, "bin0")
        return slice(start, start + metric.bins)

    def sketch_slice(self, version: int, metric: MetricPlan) -> slice:
        """The sketch region of ``metric`` in ``version``'s block (a metric the plan
        sketches). Raises KeyError for one it does not."""
        start = self.index(version, metric.name, "kll0")
        return slice(start, start + self.sketch_length)

    @property
    def sketched(self) -> tuple[MetricPlan, ...]:
        """The metrics whose per-example values the reports sketch."""
        return tuple(m for m in self.plan.metrics if self.plan.sketched(m.name))

    def to_unit(self, vector: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        """``vector`` / bounds: values in [-1, 1] for a checked report."""
        return np.asarray(vector, dtype=np.float64) / self.bounds

    def from_unit(self, unit: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        return np.asarray(unit, dtype=np.float64) * self.bounds
