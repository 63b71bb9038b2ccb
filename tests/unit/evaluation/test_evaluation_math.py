"""Federated evaluation's math: reports, summaries, quantiles and error bounds, checked
against statistics computed directly from the per-device values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.evaluation import (
    DeviceResult,
    EvaluationLayout,
    EvaluationPlan,
    MetricPlan,
    device_vector,
    mean_error_bounds,
    plan_for,
    ratio_error_bound,
    report_problem,
    results_table,
    round_metrics,
    sum_error_bounds,
    summarize,
)
from core.evaluation.sketch import bin_index, quantiles
from core.types import FederatedEvaluation, HistogramBins, MetricRange

PLAN = EvaluationPlan(
    versions=(3, 5),
    metrics=(MetricPlan("loss", 0.0, 20.0, bins=40, hist_low=0.0, hist_high=4.0),
             MetricPlan("accuracy", 0.0, 1.0, bins=10, hist_low=0.0, hist_high=1.0),
             MetricPlan("f1", 0.0, 1.0)),
    max_examples=200,
)
LAYOUT = EvaluationLayout(PLAN)


def _devices(rng: np.random.Generator, k: int) -> list[dict[int, DeviceResult]]:
    return [{v: DeviceResult(int(rng.integers(1, 300)),
                             {"loss": float(rng.gamma(2.0, 0.5)), "accuracy": float(rng.random()),
                              "f1": float(rng.random())})
             for v in PLAN.versions} for _ in range(k)]


def _sum(devices: list[dict[int, DeviceResult]]) -> np.ndarray:
    total: np.ndarray = np.sum([device_vector(LAYOUT, d) for d in devices], axis=0)
    return total


def test_the_summed_reports_give_the_means_and_cluster_standard_errors_of_the_devices() -> None:
    rng = np.random.default_rng(1)
    devices = _devices(rng, 25)
    result = {s.version: s for s in summarize(LAYOUT, _sum(devices), [0.5])}
    for v in PLAN.versions:
        n = np.array([min(d[v].examples, PLAN.max_examples) for d in devices], dtype=float)
        x = np.array([d[v].values["accuracy"] for d in devices])
        k = len(devices)
        a = (n * x).sum() / n.sum()
        se_a = math.sqrt(k / (k - 1) * ((n * (x - a)) ** 2).sum()) / n.sum()
        got = result[v].metrics["accuracy"]
        assert result[v].devices == k and result[v].examples == n.sum()
        assert got.example_mean == pytest.approx(a, rel=1e-12)
        assert got.example_se == pytest.approx(se_a, rel=1e-9)
        assert got.device_mean == pytest.approx(x.mean(), rel=1e-12)
        assert got.device_se == pytest.approx(x.std(ddof=1) / math.sqrt(k), rel=1e-9)


def test_a_device_value_outside_its_range_is_clamped_and_its_examples_capped() -> None:
    v = device_vector(LAYOUT, {3: DeviceResult(10_000, {"loss": 99.0, "accuracy": 1.5, "f1": -2}),
                               5: DeviceResult(7, {"loss": 1.0, "accuracy": 0.5, "f1": 0.5})})
    assert v[LAYOUT.index(3, "", "examples")] == PLAN.max_examples
    assert v[LAYOUT.index(3, "loss", "sum")] == 20.0
    assert v[LAYOUT.index(3, "accuracy", "sum")] == 1.0
    assert v[LAYOUT.index(3, "f1", "sum")] == 0.0
    assert report_problem(LAYOUT, v) is None
    unit = LAYOUT.to_unit(v)
    assert np.abs(unit).max() <= 1.0 and np.linalg.norm(unit) <= LAYOUT.unit_l2_bound


def test_an_infinite_value_is_clamped_and_a_nan_is_refused() -> None:
    ok = {"loss": 1.0, "accuracy": 0.5, "f1": 0.5}
    v = device_vector(LAYOUT, {3: DeviceResult(5, {**ok, "loss": math.inf}), 5: DeviceResult(5, ok)})
    assert v[LAYOUT.index(3, "loss", "sum")] == 20.0 and report_problem(LAYOUT, v) is None
    with pytest.raises(ValueError, match="metric 'f1' is NaN"):
        device_vector(LAYOUT, {3: DeviceResult(5, {**ok, "f1": math.nan}), 5: DeviceResult(5, ok)})


def test_a_missing_metric_is_named() -> None:
    with pytest.raises(ValueError, match="metric 'f1'"):
        device_vector(LAYOUT, {3: DeviceResult(5, {"loss": 1, "accuracy": 1}),
                               5: DeviceResult(5, {"loss": 1, "accuracy": 1, "f1": 1})})


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda v: v.__setitem__(LAYOUT.index(3, "", "devices"), 2.0), "'devices' value must be 1"),
    (lambda v: v.__setitem__(LAYOUT.index(3, "", "examples"), 201.0), "between 1 and max"),
    (lambda v: v.__setitem__(LAYOUT.index(5, "accuracy", "sum"), 1.2), "outside its range"),
    (lambda v: v.__setitem__(LAYOUT.index(3, "loss", "wsum"), 1e4), "'loss.wsum'"),
    (lambda v: v.__setitem__(LAYOUT.index(3, "loss", "bin39"), 1.0), "'loss.bin39'"),
    (lambda v: v.__setitem__(0, math.nan), "NaN"),
])
def test_the_coordinator_refuses_a_clear_report_that_breaks_a_bound_or_a_relation(
        tamper: object, message: str) -> None:
    v = device_vector(LAYOUT, _devices(np.random.default_rng(2), 1)[0])
    assert report_problem(LAYOUT, v.astype(np.float32)) is None  # float32 on the wire is fine
    assert callable(tamper)
    tamper(v)
    problem = report_problem(LAYOUT, v)
    assert problem is not None and message in problem


def test_quantiles_from_a_histogram_are_within_one_bin_width() -> None:
    rng = np.random.default_rng(3)
    values = rng.gamma(2.0, 0.5, size=2000)
    values = values[values < 4.0]
    counts = np.zeros(40)
    for x in values:
        counts[bin_index(x, low=0.0, high=4.0, bins=40)] += 1
    qs = [0.05, 0.1, 0.5, 0.9, 0.99]
    for q, got in zip(qs, quantiles(counts, qs, low=0.0, high=4.0), strict=True):
        assert abs(got - np.quantile(values, q)) <= 4.0 / 40


def test_quantiles_of_an_empty_or_noisy_histogram() -> None:
    assert all(math.isnan(q) for q in quantiles(np.zeros(4), [0.5], low=0, high=1))
    # DP noise can make counts negative: they count as zero.
    assert quantiles(np.array([-3.0, 0.0, 10.0, -1.0]), [0.5], low=0, high=4) == [2.5]
    with pytest.raises(ValueError, match="quantiles must be in"):
        quantiles(np.ones(3), [1.5], low=0, high=1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=50), st.floats(0.0, 1.0))
def test_a_histogram_quantile_lies_in_the_bin_of_the_true_quantile(xs: list[float],
                                                                   q: float) -> None:
    counts = np.zeros(10)
    for x in xs:
        counts[bin_index(x, low=0.0, high=1.0, bins=10)] += 1
    got = quantiles(counts, [q], low=0.0, high=1.0)[0]
    assert abs(got - np.quantile(xs, q, method="inverted_cdf")) <= 0.1 + 1e-9


def test_fewer_than_two_devices_release_no_standard_error() -> None:
    metrics = round_metrics(summarize(LAYOUT, _sum(_devices(np.random.default_rng(4), 1)), []))
    assert "eval.v3.loss.mean" in metrics
    assert "eval.v3.loss.se" not in metrics and "eval.v3.loss.device_se" not in metrics


def test_round_metrics_read_back_as_a_results_table() -> None:
    metrics = round_metrics(summarize(LAYOUT, _sum(_devices(np.random.default_rng(5), 6)),
                                      [0.025, 0.5]))
    table = results_table({**metrics, "reports": 6.0})
    assert set(table) == {3, 5}
    assert table[3][""]["devices"] == 6
    assert set(table[5]["loss"]) >= {"mean", "se", "device_mean", "device_se", "q2.5", "q50",
                                     "bin0", "bin39"}
    assert "q50" not in table[5]["f1"]  # no histogram, no quantile


def test_secagg_style_quantization_moves_the_means_within_the_bound() -> None:
    rng = np.random.default_rng(6)
    devices = _devices(rng, 30)
    exact = _sum(devices)
    step, scale = 2.0 / (2**12 - 1), 0.5
    # Each value moved by less than one step in the scaled unit space, as stochastic rounding.
    noisy = np.sum([LAYOUT.from_unit((LAYOUT.to_unit(device_vector(LAYOUT, d)) * scale
                                      + rng.uniform(-step, step, LAYOUT.length)) / scale)
                    for d in devices], axis=0)
    errors = sum_error_bounds(LAYOUT, devices=30, step=step, scale=scale)
    assert (np.abs(noisy - exact) <= errors).all()
    bounds = mean_error_bounds(LAYOUT, exact, errors)
    plain = round_metrics(summarize(LAYOUT, exact, []))
    quantized = round_metrics(summarize(LAYOUT, noisy, []))
    for name, bound in bounds.items():
        assert abs(quantized[name] - plain[name]) <= bound
        assert bound < 0.05


def test_the_ratio_bound_is_tight_at_the_worst_corner() -> None:
    a, b, ea, eb = 3.0, 4.0, 0.1, 0.2
    worst = max(abs((a + sa * ea) / (b + sb * eb) - a / b) for sa in (-1, 1) for sb in (-1, 1))
    assert worst <= ratio_error_bound(a, b, ea, eb) + 1e-15
    assert ratio_error_bound(a, b, ea, eb) == pytest.approx(worst)
    assert ratio_error_bound(1.0, 0.1, 0.0, 0.2) == math.inf


def test_plan_for_a_task_section_orders_metrics_and_takes_histogram_ranges() -> None:
    section = FederatedEvaluation(
        metrics={"zeta": MetricRange(-1, 1), "loss": MetricRange(0, 5), "alpha": MetricRange()},
        histograms={"loss": HistogramBins(bins=5), "zeta": HistogramBins(bins=4, low=0.0)})
    plan = plan_for(section, [7])
    assert [m.name for m in plan.metrics] == ["loss", "accuracy", "alpha", "zeta"]
    assert plan.metric("loss") == MetricPlan("loss", 0, 5, 5, 0, 5)
    assert plan.metric("zeta") == MetricPlan("zeta", -1, 1, 4, 0.0, 1)
    assert plan.declared == ("alpha", "zeta")
    assert EvaluationPlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="not an evaluation plan"):
        EvaluationPlan.from_json('{"versions": [1]}')
