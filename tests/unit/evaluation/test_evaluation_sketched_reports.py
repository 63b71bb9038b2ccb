"""Reports in the clear that carry KLL sketches of per-example values (core.evaluation with
``plan.sketch``): what a device writes, what the coordinator's check refuses, and the
quantiles the summaries release from merged sketches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.evaluation import (
    DeviceResult,
    EvaluationLayout,
    EvaluationPlan,
    MetricPlan,
    SketchPlan,
    capped_values,
    device_vector,
    kll,
    plan_for,
    report_problem,
    results_table,
    round_metrics,
    summarize,
)
from core.evaluation.plan import plan_problem
from core.types import FederatedEvaluation, HistogramBins

PLAN = EvaluationPlan(
    versions=(1, 2),
    metrics=(MetricPlan("loss", 0.0, 5.0, bins=10, hist_low=0.0, hist_high=5.0),
             MetricPlan("accuracy", 0.0, 1.0)),
    max_examples=300,
    sketch=SketchPlan(k=64, metrics=("loss",)),
)
LAYOUT = EvaluationLayout(PLAN)


def result(losses: np.ndarray) -> DeviceResult:
    return DeviceResult(len(losses), {"loss": float(np.mean(np.clip(losses, 0, 5))),
                                      "accuracy": 0.5}, {"loss": losses})


def device(seed: int, size: int) -> dict[int, DeviceResult]:
    rng = np.random.default_rng(seed)
    return {1: result(rng.exponential(size=size)), 2: result(rng.exponential(2.0, size=size))}


def test_plans_for_clear_reports_sketch_the_loss_and_accuracy_with_a_histogram() -> None:
    section = FederatedEvaluation(histograms={"accuracy": HistogramBins(bins=4)})
    plan = plan_for(section, (0,), sketches=True)
    assert plan.sketch == SketchPlan(kll.DEFAULT_K, ("loss", "accuracy"))
    assert plan_for(section, (0,)).sketch is None
    assert plan_for(FederatedEvaluation(), (0,), sketches=True).sketch == SketchPlan(
        kll.DEFAULT_K, ("loss",))
    assert EvaluationPlan.from_json(plan.to_json()) == plan
    # A plan without sketches reads and writes as before they existed.
    assert "sketch" not in json.loads(plan_for(section, (0,)).to_json())


def test_a_plan_may_sketch_only_its_own_per_example_metrics() -> None:
    plan = EvaluationPlan((0,), (MetricPlan("loss", 0, 1), MetricPlan("f1", 0, 1)), 10,
                          sketch=SketchPlan(64, ("f1",)))
    assert plan_problem(plan) == ("evaluate.sketch.metrics", "'f1' is not a metric of the "
                                  "plan with per-example values (loss, accuracy)")
    with pytest.raises(ValueError, match="evaluate.sketch.k"):
        EvaluationPlan.from_json(json.dumps({**json.loads(PLAN.to_json()),
                                             "sketch": {"k": 2, "metrics": ["loss"]}}))


def test_a_device_report_with_sketches_passes_the_coordinators_check() -> None:
    report = device_vector(LAYOUT, device(0, 1000), rng=np.random.default_rng(0))
    assert LAYOUT.sketch_length == kll.max_items(300, 64)
    assert report_problem(LAYOUT, report.astype(np.float32)) is None
    # The sketch is of 300 values (the cap), each within the metric's range.
    region = report[LAYOUT.sketch_slice(1, PLAN.metric("loss"))]
    sketch = kll.parse_items(region, 300, k=64)
    assert sketch.n == 300 and 0.0 <= sketch.items().min() and sketch.items().max() <= 5.0


def test_a_device_without_per_example_values_cannot_report() -> None:
    results = device(0, 50)
    results[2] = DeviceResult(50, dict(results[2].values))
    with pytest.raises(ValueError, match="model version 2: no per-example values of metric "
                                         "'loss'"):
        device_vector(LAYOUT, results)


@pytest.mark.parametrize(("index", "value", "message"), [
    (0, 7.0, "outside the metric's range"),
    (-1, 1.0, "the rest of its region must be 0"),
    (1, -1.0, "outside the metric's range"),
])
def test_a_tampered_sketch_is_refused_naming_version_and_metric(index: int, value: float,
                                                                message: str) -> None:
    report = device_vector(LAYOUT, device(1, 120), rng=np.random.default_rng(0))
    region = LAYOUT.sketch_slice(2, PLAN.metric("loss"))
    report[region.start + index if index >= 0 else region.stop + index] = value
    problem = report_problem(LAYOUT, report)
    assert problem is not None
    assert problem.startswith("model version 2: the sketch of metric 'loss': "), problem
    assert message in problem


def test_an_unsorted_sketch_level_is_refused() -> None:
    report = device_vector(LAYOUT, device(2, 40), rng=np.random.default_rng(0))
    region = LAYOUT.sketch_slice(1, PLAN.metric("loss"))
    report[region.start], report[region.start + 1] = 4.0, 0.5
    assert "level 0 of the sketch is not sorted" in (report_problem(LAYOUT, report) or "")


def test_capping_keeps_quantiles_within_one_over_n() -> None:
    values = np.random.default_rng(3).normal(size=10_007)
    kept = capped_values(values, 100)
    assert kept.size == 100
    for q in (0.1, 0.5, 0.9):
        assert abs(np.mean(values <= np.quantile(kept, q)) - q) <= 1 / 100 + 1e-9
    assert np.array_equal(capped_values(values[:50], 100), np.sort(values[:50]))


def test_released_quantiles_are_those_of_the_pooled_examples_within_the_bound() -> None:
    rng = np.random.default_rng(5)
    devices = [device(seed, int(rng.integers(20, 900))) for seed in range(12)]
    reports = [device_vector(LAYOUT, results, rng=rng) for results in devices]
    sketches: dict[tuple[int, str], kll.KllSketch] = {}
    pooled: dict[int, list[np.ndarray]] = {1: [], 2: []}
    for results, report in zip(devices, reports, strict=True):
        for version in (1, 2):
            n = int(report[LAYOUT.index(version, "", "examples")])
            sketch = kll.parse_items(report[LAYOUT.sketch_slice(version, PLAN.metric("loss"))],
                                     n, k=64)
            held = sketches.get((version, "loss"))
            sketches[(version, "loss")] = sketch if held is None else kll.merge(
                [held, sketch], rng=rng)
            pooled[version].append(np.clip(capped_values(
                results[version].per_example["loss"], n), 0, 5).astype(np.float32))
    sums = np.sum(reports, axis=0)
    metrics = round_metrics(summarize(LAYOUT, sums, (0.1, 0.5, 0.9), sketches=sketches))
    for version in (1, 2):
        data = np.sort(np.concatenate(pooled[version]))
        bound = metrics[f"eval.v{version}.loss.example_rank_error"]
        assert 0.0 < bound < 0.05
        for q in (0.1, 0.5, 0.9):
            value = metrics[f"eval.v{version}.loss.example_q{round(q * 100)}"]
            low = np.searchsorted(data, value, side="left") / data.size
            high = np.searchsorted(data, value, side="right") / data.size
            assert low - bound <= q <= high + bound, (version, q)
    table = results_table(metrics)
    assert set(table[1]["loss"]) >= {"example_q10", "example_q50", "example_q90",
                                      "example_rank_error", "q50", "mean"}
    assert "example_q50" not in table[1]["accuracy"]
