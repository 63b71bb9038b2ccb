"""Experiments between model versions: a task file's ``evaluate.experiment`` section (errors
name the file and the field), the evaluation plan's arm assignment and report check, and the
statistics recovered from released round metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.evaluation import (
    DeviceResult,
    EvaluationLayout,
    device_vector,
    report_problem,
    round_metrics,
    summarize,
)
from core.evaluation.plan import EvaluationPlan, plan_for
from core.experiments import Action, ArmStats, TrafficSplit, assign_arm
from core.experiments.spec import parse_experiment_spec
from core.experiments.versions import analyze, round_sums, state_metrics, state_to_json
from core.taskspec import (
    TaskSpecError,
    load_task_file,
    parse_task_yaml,
    spec_from_dict,
    spec_to_dict,
)

TASK = """
name: ab
kind: evaluate
model: {architecture: logistic_regression, arguments: {input_dim: 4, num_classes: 3}}
rounds: 5
clients_per_round: 8
min_reports: 2
evaluate:
  source_task: train-1
  experiment:
    arms:
      - {name: control, weight: 0.5, version: 1}
      - {name: candidate, weight: 0.5, version: 3}
    primary_metric: {name: accuracy, direction: increase}
    guardrails: [{metric: loss, max_increase: 0.1}]
    mde: 0.02
    alpha: 0.05
    horizon_rounds: 5
"""


def test_a_task_file_with_an_experiment_evaluates_its_arms_versions_with_a_stored_salt(
) -> None:
    spec = parse_task_yaml(TASK, source="ab.yaml")
    experiment = spec.evaluate.experiment
    assert experiment is not None and len(experiment.salt) == 32  # drawn: 128 bits, hex
    assert [(a.name, a.version) for a in experiment.arms] == [("control", 1), ("candidate", 3)]
    # Stored and read back, the salt (so the assignment) stays.
    assert spec_from_dict(spec_to_dict(spec)) == spec
    again = parse_task_yaml(TASK, source="ab.yaml").evaluate.experiment
    assert again is not None and again.salt != experiment.salt  # a new file read, a new salt


@pytest.mark.parametrize(("edit", "field", "words"), [
    ("weight: 0.5, version: 3", "evaluate.experiment.arms[1].weight",
     "weight: -0.5, version: 3"),
    ("version: 3}", "evaluate.experiment.arms[1].version", "}"),
    ("version: 3}", "evaluate.experiment.arms[1].version", "version: 1}"),
    ("version: 3}", "evaluate.experiment.arms[1].version", "version: -2}"),
    ("name: accuracy, direction", "evaluate.experiment.primary_metric.name",
     "name: f1, direction"),
    ("direction: increase", "evaluate.experiment.primary_metric.direction",
     "direction: upwards"),
    ("{metric: loss, max_increase: 0.1}", "evaluate.experiment.guardrails[0].metric",
     "{metric: latency, max_increase: 0.1}"),
    ("horizon_rounds: 5", "evaluate.experiment.horizon_rounds", "horizon_rounds: 9"),
    ("alpha: 0.05", "evaluate.experiment.alpha", "alpha: 0.7"),
    ("alpha: 0.05", "evaluate.experiment.alphas", "alphas: 0.05"),
    ("mde: 0.02", "evaluate.experiment.mde", "mde: two"),
    ("mde: 0.02", "evaluate.experiment.primary_metric.covariate",
     "mde: 0.02\n    primary_metric: {name: accuracy, direction: increase, covariate: pre}"),
])
def test_a_bad_experiment_section_names_the_file_and_the_field(
        tmp_path: Path, edit: str, field: str, words: str) -> None:
    path = tmp_path / "experiment.yaml"
    text = TASK.replace(edit, words, 1)
    if "covariate" in words:  # a second primary_metric key replaces the first
        text = text.replace("    primary_metric: {name: accuracy, direction: increase}\n", "",
                            1)
    path.write_text(text)
    with pytest.raises(TaskSpecError) as info:
        load_task_file(path)
    assert info.value.field == field, str(info.value)
    assert str(info.value).startswith(f"{path}: field '{field}'")


def test_an_experiment_does_not_take_central_dp_or_other_versions() -> None:
    with pytest.raises(TaskSpecError, match="field 'evaluate.versions'"):
        parse_task_yaml(TASK.replace("  source_task: train-1\n",
                                     "  source_task: train-1\n  versions: [1, 2]\n"))
    with pytest.raises(TaskSpecError, match="field 'privacy'.*exact device counts"):
        parse_task_yaml(TASK + "privacy: {mode: central, noise_multiplier: 1.0, delta: 1.0e-5, "
                               "max_epsilon: 9, clip: 1.0, population: 100}\n")


def plan(salt: str = "s") -> EvaluationPlan:
    spec = parse_task_yaml(TASK.replace("    horizon_rounds: 5",
                                        f"    horizon_rounds: 5\n    salt: {salt}"))
    return plan_for(spec.evaluate, (1, 3))


def test_the_plan_assigns_each_device_one_version_by_the_keyed_hash() -> None:
    p = plan()
    assert EvaluationPlan.from_json(p.to_json()) == p
    devices = [f"d{i}" for i in range(400)]
    versions = [p.version_for(d) for d in devices]
    assert versions == [(1, 3)[assign_arm(d, salt="s", split=TrafficSplit([0.5, 0.5]))]
                        for d in devices]
    assert 150 < versions.count(1) < 250
    other = plan("another-salt")
    assert [other.version_for(d) for d in devices] != versions  # a new salt, a new draw


def test_a_report_fills_only_the_devices_arm_and_is_checked_against_it() -> None:
    layout = EvaluationLayout(plan())
    device = next(d for d in (f"d{i}" for i in range(50)) if layout.plan.version_for(d) == 3)
    result = {3: DeviceResult(10, {"loss": 0.5, "accuracy": 0.8})}
    vector = device_vector(layout, result)
    assert vector[layout.index(1, "", "devices")] == 0.0  # the control's block stays zero
    assert report_problem(layout, vector, device_id=device) is None
    wrong = device_vector(layout, {1: result[3]})
    assert "is assigned model version 3 in this experiment, not 1" in str(
        report_problem(layout, wrong, device_id=device))
    both = vector + wrong
    assert "fills 2 of [1, 3]" in str(report_problem(layout, both))
    with pytest.raises(ValueError, match="evaluates one version"):
        device_vector(layout, {1: result[3], 3: result[3]})


def test_the_arms_sums_are_recovered_exactly_from_the_released_metrics() -> None:
    layout = EvaluationLayout(plan())
    experiment = parse_experiment_spec({
        "arms": [{"name": "control", "weight": 0.5, "version": 1},
                 {"name": "candidate", "weight": 0.5, "version": 3}],
        "primary_metric": {"name": "accuracy", "direction": "increase"},
        "mde": 0.02, "alpha": 0.05, "horizon_rounds": 5, "salt": "s"})
    rng = np.random.default_rng(0)
    values = {1: rng.uniform(0.3, 0.9, 7), 3: rng.uniform(0.3, 0.9, 5)}
    vectors = [device_vector(layout, {v: DeviceResult(10, {"loss": 1.0, "accuracy": float(x)})})
               for v, xs in values.items() for x in xs]
    released = round_metrics(summarize(layout, np.sum(vectors, axis=0), ()))
    sums = round_sums(experiment, released)
    for arm, version in (("control", 1), ("candidate", 3)):
        got, want = sums[arm]["accuracy"].stats(), ArmStats.from_values(values[version])
        assert got.count == want.count
        assert got.mean == pytest.approx(want.mean, rel=1e-9)
        assert got.m2 == pytest.approx(want.m2, rel=1e-6)
    state = analyze(experiment, [released])
    assert state.decision.action is Action.CONTINUE
    assert state.arms[0].devices == 7 and state.arms[1].devices == 5
    metrics = state_metrics(state)
    assert metrics["experiment.control.devices"] == 7
    data = state_to_json(experiment, state)
    assert data["decision"]["action"] == "continue"
    assert data["comparisons"][0]["arm"] == "candidate"
    with pytest.raises(ValueError, match="at least one committed round"):
        analyze(experiment, [])
