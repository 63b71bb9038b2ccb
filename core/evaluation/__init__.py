"""Federated evaluation as pure math: what devices report (a fixed-layout vector of sums),
what the coordinator releases from the summed reports (means, standard errors, quantiles
from fixed-bin histograms; in the clear, quantiles of per-example values from merged KLL
sketches) and how far secure aggregation can move them. No network; torch only in
:mod:`~core.evaluation.per_example`, imported where it is used.

Modules: :mod:`~core.evaluation.plan` (what devices are asked), :mod:`~core.evaluation.
layout` (the vector), :mod:`~core.evaluation.report` (a device's vector, the check of a
clear one), :mod:`~core.evaluation.summary` (sums -> results), :mod:`~core.evaluation.
sketch` (histogram quantiles), :mod:`~core.evaluation.kll` (the KLL quantile sketch),
:mod:`~core.evaluation.per_example` (a model's per-example values, torch),
:mod:`~core.evaluation.bounds` (quantization error bounds), :mod:`~core.evaluation.bundle`
(the evaluation task's model file).
"""

from core.evaluation.bounds import mean_error_bounds, ratio_error_bound, sum_error_bounds
from core.evaluation.bundle import bundle_metadata, bundle_tensors, read_plan, split_bundle
from core.evaluation.kll import KllSketch
from core.evaluation.layout import TENSOR_NAME, EvaluationLayout
from core.evaluation.plan import EvaluationPlan, MetricPlan, SketchPlan, plan_for, plan_problem
from core.evaluation.report import (
    DeviceResult,
    capped_values,
    device_vector,
    encode_masked_report,
    report_problem,
    report_scale,
)
from core.evaluation.summary import (
    MetricSummary,
    VersionSummary,
    results_table,
    round_metrics,
    summarize,
)

__all__ = [
    "TENSOR_NAME",
    "DeviceResult",
    "EvaluationLayout",
    "EvaluationPlan",
    "KllSketch",
    "MetricPlan",
    "MetricSummary",
    "SketchPlan",
    "VersionSummary",
    "bundle_metadata",
    "bundle_tensors",
    "capped_values",
    "device_vector",
    "encode_masked_report",
    "mean_error_bounds",
    "plan_for",
    "plan_problem",
    "ratio_error_bound",
    "read_plan",
    "report_problem",
    "report_scale",
    "results_table",
    "round_metrics",
    "split_bundle",
    "sum_error_bounds",
    "summarize",
]
