"""What a federated evaluation asks of every device: the model versions, the metrics with the
range each is clamped to, the histograms (fixed bins), the cap on a device's examples and,
for reports in the clear, which metrics' per-example values go in a KLL sketch.

The coordinator resolves a task's ``evaluate`` section (:class:`core.types.FederatedEvaluation`)
into an :class:`EvaluationPlan` at launch and ships it to devices as JSON inside the evaluation
bundle (:mod:`core.evaluation.bundle`), so the plan is covered by the bundle's sha256 that
the device plan carries (and that secure aggregation's configuration hash compares between
devices). Both sides derive the report's vector layout from it
(:class:`core.evaluation.layout.EvaluationLayout`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.evaluation.kll import DEFAULT_K, MAX_K, MIN_K
from core.experiments.assignment import (
    StratifiedSplit,
    TrafficSplit,
    assign_arm,
    stratum_problem,
)
from core.types import EvaluationSplit, FederatedEvaluation

#: Metrics every evaluation reports, with their default ranges: the model's loss (mean per
#: example, clamped to [0, 20] nats unless the task sets another range) and accuracy.
BUILT_IN_METRICS: Mapping[str, tuple[float, float]] = {"loss": (0.0, 20.0),
                                                         "accuracy": (0.0, 1.0)}
METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
MAX_METRICS = 16
MAX_BINS = 256
MAX_VERSIONS = 8
#: Largest magnitude of a metric range: n^2 m^2 sums stay far inside float64.
MAX_RANGE = 1e6
#: Metrics that have a value per example (a device can sketch their distribution); a declared
#: metric has one value per device (the model's metrics hook sees all its examples at once).
PER_EXAMPLE_METRICS = ("loss", "accuracy")


@dataclass(frozen=True)
class MetricPlan:
    """One metric: device values are clamped to [low, high]; ``bins`` > 0 also sums a
    histogram of the device values over [hist_low, hist_high] (values outside fall in the end
    bins)."""

    name: str
    low: float
    high: float
    bins: int = 0
    hist_low: float = 0.0
    hist_high: float = 0.0

    @property
    def magnitude(self) -> float:
        """The largest |value| after clamping."""
        return max(abs(self.low), abs(self.high))

    @property
    def bin_width(self) -> float:
        return (self.hist_high - self.hist_low) / self.bins if self.bins else math.nan


@dataclass(frozen=True)
class SketchPlan:
    """Reports in the clear only (no secure aggregation, no DP: a KLL merge is not a sum):
    each device adds a KLL sketch (:mod:`core.evaluation.kll`) of its per-example values of
    each of ``metrics`` (clamped to the metric's range, at most ``max_examples`` of them) to
    every version's block it fills, and the coordinator releases quantiles of the pooled
    examples from the merged sketches."""

    k: int = DEFAULT_K
    metrics: tuple[str, ...] = ("loss",)


@dataclass(frozen=True)
class ArmAssignment:
    """An experiment's assignment: a device evaluates only the version of its arm,
    ``versions[assign_arm(device_id, salt, split(weights))]`` (``weights`` in the plan's
    version order). Every device's plan carries the same assignment, so under secure
    aggregation the devices' configuration hashes agree; the coordinator checks each clear
    report against the arm of the device that sent it, so a device cannot pick its arm.

    ``covariate``: CUPED's covariate version (an experiment whose primary metric has a
    ``<metric>@<arm>`` covariate): every device also evaluates this version, and its
    metrics there fill the ``cov_*`` fields of its arm's block (:mod:`core.evaluation.
    layout`); None: no covariate (and the plan's JSON is what it was before covariates).

    ``strata``: per-stratum splits (stratum name, weights in the plan's version order): a
    device that declares one of these strata at check-in is assigned by that split, any
    other device by ``weights`` (:class:`core.experiments.assignment.StratifiedSplit`);
    empty: no strata (the plan's JSON is what it was before strata)."""

    salt: str
    weights: tuple[float, ...]
    covariate: int | None = None
    strata: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def split(self) -> TrafficSplit | StratifiedSplit:
        default = TrafficSplit(self.weights)
        if not self.strata:
            return default
        return StratifiedSplit(default, {name: TrafficSplit(w) for name, w in self.strata})


@dataclass(frozen=True)
class EvaluationPlan:
    """``versions``: the model versions evaluated, in report order (version numbers of the
    source task, or 0 for the task's own initial model); ``split``: which local examples;
    ``assignment``: set in an A/B experiment, where each device evaluates one version."""

    versions: tuple[int, ...]
    metrics: tuple[MetricPlan, ...]
    max_examples: int
    split: EvaluationSplit = EvaluationSplit.TEST
    assignment: ArmAssignment | None = None
    sketch: SketchPlan | None = None

    def sketched(self, name: str) -> bool:
        """Whether devices sketch the per-example values of metric ``name``."""
        return self.sketch is not None and name in self.sketch.metrics

    def version_for(self, device_id: str, stratum: str | None = None) -> int | None:
        """The one version ``device_id`` (declaring ``stratum``, None: none) evaluates in an
        experiment; None otherwise (it evaluates them all). Raises ``ValueError`` for an
        empty device id."""
        if self.assignment is None:
            return None
        arm = assign_arm(device_id, salt=self.assignment.salt,
                         split=self.assignment.split(), stratum=stratum)
        return self.versions[arm]

    def versions_for(self, device_id: str, stratum: str | None = None
                     ) -> tuple[int, ...] | None:
        """The versions ``device_id`` (declaring ``stratum``) evaluates in an experiment:
        its arm's, then the covariate version if there is one and it is another; None
        outside an experiment (it evaluates them all). Raises ``ValueError`` for an empty
        device id."""
        mine = self.version_for(device_id, stratum)
        if mine is None:
            return None
        assert self.assignment is not None
        covariate = self.assignment.covariate
        return (mine,) if covariate is None or covariate == mine else (mine, covariate)

    def metric(self, name: str) -> MetricPlan:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def declared(self) -> tuple[str, ...]:
        """The metrics the model's metrics hook must supply (not built in)."""
        return tuple(m.name for m in self.metrics if m.name not in BUILT_IN_METRICS)

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "versions": list(self.versions), "max_examples": self.max_examples,
            "split": self.split.value,
            "metrics": [[m.name, m.low, m.high, m.bins, m.hist_low, m.hist_high]
                        for m in self.metrics],
        }
        if self.assignment is not None:
            data["assignment"] = {"salt": self.assignment.salt,
                                  "weights": list(self.assignment.weights)}
            if self.assignment.covariate is not None:
                data["assignment"]["covariate"] = self.assignment.covariate
            if self.assignment.strata:
                data["assignment"]["strata"] = {name: list(w)
                                                for name, w in self.assignment.strata}
        if self.sketch is not None:  # absent otherwise: such plans read as they did before
            data["sketch"] = {"k": self.sketch.k, "metrics": list(self.sketch.metrics)}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvaluationPlan:
        """Raises ValueError (saying what) for a plan that is not one this code writes."""
        try:
            data = json.loads(text)
            plan = cls(
                versions=tuple(int(v) for v in data["versions"]),
                metrics=tuple(MetricPlan(str(n), float(lo), float(hi), int(b), float(hl),
                                         float(hh))
                              for n, lo, hi, b, hl, hh in data["metrics"]),
                max_examples=int(data["max_examples"]),
                split=EvaluationSplit(data["split"]),
                assignment=(None if "assignment" not in data else ArmAssignment(
                    str(data["assignment"]["salt"]),
                    tuple(float(w) for w in data["assignment"]["weights"]),
                    (None if data["assignment"].get("covariate") is None
                     else int(data["assignment"]["covariate"])),
                    tuple((str(name), tuple(float(w) for w in weights))
                          for name, weights in sorted(
                              data["assignment"].get("strata", {}).items())))),
                sketch=(None if "sketch" not in data else SketchPlan(
                    int(data["sketch"]["k"]),
                    tuple(str(m) for m in data["sketch"]["metrics"]))),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not an evaluation plan: {exc!r}") from None
        problem = plan_problem(plan)
        if problem is not None:
            raise ValueError(f"not a valid evaluation plan: {problem[0]}: {problem[1]}")
        return plan


def plan_for(evaluation: FederatedEvaluation, versions: Sequence[int], *,
             sketches: bool = False) -> EvaluationPlan:
    """The plan of a task's ``evaluate`` section once its versions are resolved. Metrics:
    loss and accuracy, then the declared ones by name (an order that survives storage);
    a declared ``loss`` or ``accuracy`` only changes that metric's range.

    ``sketches``: devices also sketch per-example values (:class:`SketchPlan`; only for
    reports in the clear, never under secure aggregation or DP): of the loss always, and of
    accuracy when it has a histogram (its examples' values are 0 or 1, so its quantiles say
    little)."""
    ranges = dict(BUILT_IN_METRICS)
    for name in sorted(evaluation.metrics):
        r = evaluation.metrics[name]
        ranges[name] = (r.low, r.high)
    metrics = []
    for name, (low, high) in ranges.items():
        hist = evaluation.histograms.get(name)
        if hist is None:
            metrics.append(MetricPlan(name, low, high))
        else:
            metrics.append(MetricPlan(
                name, low, high, hist.bins,
                low if hist.low is None else hist.low, high if hist.high is None else hist.high))
    assignment = None
    experiment = evaluation.experiment
    if experiment is not None:
        weight = {a.version: a.weight for a in experiment.arms}
        by_name = {a.name: a.version for a in experiment.arms}
        covariate_arm = experiment.primary.covariate_arm
        index = {a.version: i for i, a in enumerate(experiment.arms)}
        strata = tuple(
            (name, tuple(weights[index[v]] if v in index else 0.0 for v in versions))
            for name, weights in sorted(experiment.strata.items()))
        assignment = ArmAssignment(experiment.salt, tuple(weight.get(v, 0.0) for v in versions),
                                   None if covariate_arm is None else by_name.get(covariate_arm),
                                   strata)
    sketch = None
    if sketches:
        sketch = SketchPlan(DEFAULT_K, tuple(
            m.name for m in metrics if m.name == "loss" or (
                m.name in PER_EXAMPLE_METRICS and m.bins)))
    return EvaluationPlan(tuple(versions), tuple(metrics), evaluation.max_examples,
                          evaluation.split, assignment, sketch)


def plan_problem(plan: EvaluationPlan) -> tuple[str, str] | None:
    """(the field as a task file spells it, what is wrong) when ``plan`` is not valid."""
    if not 1 <= len(plan.versions) <= MAX_VERSIONS:
        return "evaluate.versions", f"1 to {MAX_VERSIONS} versions, got {len(plan.versions)}"
    if len(set(plan.versions)) != len(plan.versions) or min(plan.versions) < 0:
        return "evaluate.versions", f"distinct versions >= 0, got {list(plan.versions)}"
    if plan.assignment is not None:
        weights = plan.assignment.weights
        if (len(weights) != len(plan.versions) or len(weights) < 2
                or not all(math.isfinite(w) and w >= 0 for w in weights)
                or abs(math.fsum(weights) - 1.0) > 1e-9):
            return ("evaluate.experiment.arms", f"one weight >= 0 per version, summing to 1, "
                                                f"got {list(weights)} for {list(plan.versions)}")
        for name, split in plan.assignment.strata:
            if stratum_problem(name) is not None:
                return "evaluate.experiment.strata", f"stratum {name[:40]!r}: " \
                                                     f"{stratum_problem(name)}"
            if (len(split) != len(weights)
                    or not all(math.isfinite(w) and w >= 0 for w in split)
                    or abs(math.fsum(split) - 1.0) > 1e-9):
                return (f"evaluate.experiment.strata.{name}", f"one weight >= 0 per version, "
                                                              f"summing to 1, got {list(split)}")
        if not plan.assignment.salt:
            return "evaluate.experiment.salt", "must not be empty"
        covariate = plan.assignment.covariate
        if covariate is not None and covariate not in plan.versions:
            return ("evaluate.experiment.primary_metric.covariate",
                    f"the covariate's version {covariate} is not one of {list(plan.versions)}")
    if not 1 <= plan.max_examples <= 1 << 20:
        return ("evaluate.max_examples", f"must be between 1 and {1 << 20}, got "
                                         f"{plan.max_examples}")
    if len(plan.metrics) > MAX_METRICS:
        return "evaluate.metrics", f"at most {MAX_METRICS} metrics, got {len(plan.metrics)}"
    names = [m.name for m in plan.metrics]
    if len(set(names)) != len(names):
        return "evaluate.metrics", "a metric is named twice"
    for m in plan.metrics:
        if not METRIC_NAME.fullmatch(m.name):
            return "evaluate.metrics", (f"{m.name[:60]!r} is not a metric name (a letter, then "
                                        f"up to 39 letters, digits or _)")
        if not -MAX_RANGE <= m.low < m.high <= MAX_RANGE:
            return (f"evaluate.metrics.{m.name}", f"needs low < high within +-{MAX_RANGE:g}, "
                                                  f"got [{m.low:g}, {m.high:g}]")
        if m.bins:
            if not 1 <= m.bins <= MAX_BINS:
                return f"evaluate.histograms.{m.name}.bins", f"1 to {MAX_BINS}, got {m.bins}"
            if not m.hist_low < m.hist_high:
                return (f"evaluate.histograms.{m.name}", f"needs low < high, got "
                                                         f"[{m.hist_low:g}, {m.hist_high:g}]")
    if plan.sketch is not None:
        if not MIN_K <= plan.sketch.k <= MAX_K:
            return "evaluate.sketch.k", f"{MIN_K} to {MAX_K}, got {plan.sketch.k}"
        for name in plan.sketch.metrics:
            if name not in names or name not in PER_EXAMPLE_METRICS:
                return ("evaluate.sketch.metrics", f"{name[:60]!r} is not a metric of the plan "
                        f"with per-example values ({', '.join(PER_EXAMPLE_METRICS)})")
        if len(set(plan.sketch.metrics)) != len(plan.sketch.metrics):
            return "evaluate.sketch.metrics", "a metric is named twice"
    return None


def describe(plan: EvaluationPlan) -> dict[str, Any]:
    """Plain data for logs and launch lines."""
    return {"versions": list(plan.versions), "metrics": [m.name for m in plan.metrics],
            "histograms": [m.name for m in plan.metrics if m.bins],
            "max_examples": plan.max_examples, "split": plan.split.value,
            "experiment": plan.assignment is not None,
            "sketched": list(plan.sketch.metrics) if plan.sketch is not None else []}
