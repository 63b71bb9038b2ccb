"""Task files of kind ``evaluate``: what they may say, and errors that name file and field."""

from __future__ import annotations

import pytest

from core.taskspec import TaskSpecError, parse_task_yaml, spec_from_dict, spec_to_dict
from core.types import EvaluationSplit, HistogramBins, MetricRange, TaskKind

BASE = """\
name: eval-digits
kind: evaluate
model: {architecture: mlp, arguments: {input_dim: 64, hidden: [8], num_classes: 10}}
rounds: 1
clients_per_round: 4
min_reports: 3
"""


def test_an_evaluate_section_is_read_and_survives_storage() -> None:
    spec = parse_task_yaml(BASE + """\
evaluate:
  source_task: digits-mlp-1234
  versions: [3, 5]
  split: all
  max_examples: 256
  metrics: {f1: {low: 0, high: 1}, loss: {high: 8}}
  histograms: {loss: {bins: 16}, f1: {bins: 10, low: 0.5}}
  quantiles: [0.5, 0.9]
""", source="e.yaml")
    assert spec.kind is TaskKind.EVALUATE
    section = spec.evaluate
    assert section.versions == (3, 5) and section.split is EvaluationSplit.ALL
    assert section.metrics == {"f1": MetricRange(0, 1), "loss": MetricRange(0, 8)}
    assert section.histograms["f1"] == HistogramBins(10, 0.5, None)
    assert spec_from_dict(spec_to_dict(spec)) == spec


@pytest.mark.parametrize(("extra", "field", "message"), [
    ("evaluate: {histograms: {f2: {bins: 10}}}", "evaluate.histograms.f2",
     "is not a metric of the task"),
    ("evaluate: {histograms: {loss: {bins: 0}}}", "evaluate.histograms.loss.bins",
     "between 1 and 256"),
    ("evaluate: {metrics: {f1: {low: 2, high: 1}}}", "evaluate.metrics.f1", "low < high"),
    ("evaluate: {metrics: {f1: 3}}", "evaluate.metrics.f1", "expected a mapping"),
    ("evaluate: {metrics: {'9x': {}}}", "evaluate.metrics", "is not a metric name"),
    ("evaluate: {versions: [3]}", "evaluate.versions", "only version 0"),
    ("evaluate: {source_task: t, versions: [1, 1]}", "evaluate.versions", "distinct"),
    ("evaluate: {quantiles: [2]}", "evaluate.quantiles[0]", "must be in [0, 1]"),
    ("evaluate: {split: validation}", "evaluate.split", "expected one of"),
    ("evaluate: {max_examples: 0}", "evaluate.max_examples", "between 1"),
    ("evaluation: {fraction: 0.5}", "evaluation", "side evaluation of a training task"),
    ("aggregation: {mode: async}", "aggregation", "synchronous rounds"),
    ("privacy: {mode: local, local: {noise_multiplier: 1.0, max_grad_norm: 1.0, "
     "delta: 1.0e-5, max_epsilon: 3}}", "privacy.mode", "supports central DP"),
    ("privacy: {mode: central, noise_multiplier: 1.0, delta: 1.0e-5, max_epsilon: 9, "
     "population: 10, clip: {target_quantile: 0.5, initial: 1.0, learning_rate: 0.2, "
     "bit_noise: 4.0}}", "privacy.clip",
     "needs a fixed clip"),
])
def test_a_bad_evaluate_task_names_the_file_and_the_field(extra: str, field: str,
                                                          message: str) -> None:
    with pytest.raises(TaskSpecError) as err:
        parse_task_yaml(BASE + extra + "\n", source="e.yaml")
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(f"e.yaml: field '{field}': ") and message in str(err.value)


def test_a_training_task_has_no_evaluate_section() -> None:
    with pytest.raises(TaskSpecError, match="field 'evaluate': only a task of kind 'evaluate'"):
        parse_task_yaml(BASE.replace("kind: evaluate\n", "") + "evaluate: {max_examples: 3}\n",
                        source="t.yaml")
    assert parse_task_yaml(BASE.replace("kind: evaluate\n", ""), source="t").kind is TaskKind.TRAIN
