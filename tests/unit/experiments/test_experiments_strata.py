"""Per-stratum traffic splits: what a stratum name may be, the arm a device's plan gives it
under its stratum's split, the stratified sample-ratio check, and where strata are refused
(secure aggregation, partitioned training), naming the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.evaluation.plan import EvaluationPlan, plan_for, plan_problem
from core.experiments import (
    ExperimentSpecError,
    TrafficSplit,
    assign_arm,
    parse_experiment_spec,
    srm_check,
    stratified_srm_check,
    stratum_problem,
)
from core.experiments.training import parse_training_arms
from core.experiments.versions import DEFAULT_STRATUM, analyze, strata_key, stratum_label
from core.taskspec import TaskSpecError, parse_task_yaml
from core.types import FederatedEvaluation
from protos.convert import check_in_stratum_from_proto
from protos.fedcoord.v1 import device_pb2

SALT = "strata-test-salt"
IDS = [f"device-{i}" for i in range(2000)]


def experiment(**kw: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "arms": [{"name": "control", "weight": 0.5, "version": 3},
                 {"name": "candidate", "weight": 0.5, "version": 7}],
        "primary_metric": {"name": "accuracy", "direction": "increase"},
        "mde": 0.05, "alpha": 0.05, "horizon_rounds": 3, "salt": SALT,
        "strata": {"low_end": {"control": 1.0},
                   "high_end": {"control": 0.2, "candidate": 0.8}},
    }
    raw.update(kw)
    return raw


def plan(**kw: Any) -> EvaluationPlan:
    section = FederatedEvaluation(source_task="t", versions=(3, 7),
                                  experiment=parse_experiment_spec(experiment(**kw)))
    return plan_for(section, (3, 7))


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["low_end", "A-1", "x" * 32])
def test_a_stratum_name_is_up_to_32_letters_digits_underscores_or_dashes(name: str) -> None:
    assert stratum_problem(name) is None


@pytest.mark.parametrize(("name", "why"), [
    ("", "must not be empty"), ("x" * 33, "at most 32 characters"),
    ("low end", "letters, digits"), ("a.b", "letters, digits"), ("ü", "letters, digits"),
])
def test_other_names_are_not_strata(name: str, why: str) -> None:
    problem = stratum_problem(name)
    assert problem is not None and why in problem


def test_an_experiment_naming_a_stratum_no_device_can_declare_is_refused() -> None:
    with pytest.raises(ExperimentSpecError, match="strata") as info:
        parse_experiment_spec(experiment(strata={"low end": {"control": 1.0}}))
    assert info.value.field == "strata"


def test_the_wire_empty_stratum_is_none() -> None:
    assert check_in_stratum_from_proto(device_pb2.CheckInRequest()) is None
    assert check_in_stratum_from_proto(device_pb2.CheckInRequest(stratum="low_end")) == \
        "low_end"


# ---------------------------------------------------------------- the plan's assignment


def test_a_devices_arm_follows_its_strata_split_and_the_hash_stays_the_same() -> None:
    p = plan()
    high = [p.version_for(d, "high_end") for d in IDS]
    assert abs(high.count(7) / len(IDS) - 0.8) < 0.04
    for d in IDS[:200]:
        u_arm = assign_arm(d, salt=SALT, split=TrafficSplit([0.2, 0.8]))
        assert p.version_for(d, "high_end") == (3, 7)[u_arm]
    # No stratum, or one the experiment does not name: the default 50/50 split.
    for d in IDS[:200]:
        default = (3, 7)[assign_arm(d, salt=SALT, split=TrafficSplit([0.5, 0.5]))]
        assert p.version_for(d) == p.version_for(d, "tablet") == default


def test_weight_zero_in_a_stratum_excludes_the_arm_there() -> None:
    p = plan()
    assert {p.version_for(d, "low_end") for d in IDS} == {3}
    assert p.versions_for(IDS[0], "low_end") == (3,)


def test_the_plans_strata_survive_json_and_a_plan_without_strata_reads_as_before() -> None:
    p = plan()
    assert p.assignment is not None
    assert dict(p.assignment.strata) == {"high_end": (0.2, 0.8), "low_end": (1.0, 0.0)}
    assert EvaluationPlan.from_json(p.to_json()) == p
    plain = plan(strata={})
    assert '"strata"' not in plain.to_json()
    assert EvaluationPlan.from_json(plain.to_json()) == plain


def test_a_plan_with_a_bad_strata_split_is_not_valid() -> None:
    import dataclasses
    p = plan()
    assert p.assignment is not None
    bad = dataclasses.replace(p, assignment=dataclasses.replace(
        p.assignment, strata=(("low_end", (0.7, 0.7)),)))
    assert plan_problem(bad) == ("evaluate.experiment.strata.low_end",
                                 "one weight >= 0 per version, summing to 1, got [0.7, 0.7]")


# ---------------------------------------------------------------- sample-ratio check


def test_healthy_strata_pass_the_stratified_check_though_pooled_counts_look_skewed() -> None:
    weights = {"low_end": [1.0, 0.0], "high_end": [0.2, 0.8]}
    counts = {"low_end": [600, 0], "high_end": [81, 319]}
    result = stratified_srm_check(counts, weights)
    assert not result.flagged and result.p_value > 0.5
    assert result.observed == (681, 319)
    assert result.expected == pytest.approx((680.0, 320.0))
    assert srm_check([681, 319], [0.5, 0.5]).flagged  # the default split is the wrong yardstick


def test_opposite_skews_that_cancel_in_the_pooled_counts_are_caught() -> None:
    weights = {"a": [0.5, 0.5], "b": [0.5, 0.5]}
    counts = {"a": [300, 200], "b": [200, 300]}
    assert not srm_check([500, 500], [0.5, 0.5]).flagged
    result = stratified_srm_check(counts, weights)
    assert result.flagged
    # Per-stratum chi-square statistics add, with their degrees of freedom.
    assert result.statistic == pytest.approx(20.0 + 20.0)


def test_one_stratum_is_the_plain_check() -> None:
    plain = srm_check([530, 470], [0.5, 0.5])
    one = stratified_srm_check({"a": [530, 470]}, {"a": [0.5, 0.5]})
    assert one.p_value == pytest.approx(plain.p_value)
    assert one.statistic == pytest.approx(plain.statistic)


def test_a_device_in_an_arm_its_stratum_excludes_is_a_certain_mismatch() -> None:
    result = stratified_srm_check({"low_end": [10, 1], "high_end": [2, 8]},
                                  {"low_end": [1.0, 0.0], "high_end": [0.2, 0.8]})
    assert result.flagged and result.p_value == 0.0


def test_no_devices_is_nothing_to_test() -> None:
    result = stratified_srm_check({"a": [0, 0]}, {"a": [0.5, 0.5]})
    assert result.p_value == 1.0 and not result.flagged


def test_counts_of_a_stratum_without_a_split_are_refused() -> None:
    with pytest.raises(ValueError, match="no split"):
        stratified_srm_check({"ghost": [1, 1]}, {"a": [0.5, 0.5]})


def test_an_experiment_under_a_healthy_stratified_assignment_is_not_flagged() -> None:
    """The rounds' released per-stratum counts drive the experiment's SRM: a skew the
    default split would call a mismatch is what the strata's splits promise."""
    spec = parse_experiment_spec(experiment())
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(3):
        low, high = 200, 100
        high_candidate = int(rng.binomial(high, 0.8))
        metrics = {
            "eval.v3.devices": float(low + high - high_candidate),
            "eval.v7.devices": float(high_candidate),
            strata_key("low_end", 3): float(low), strata_key("low_end", 7): 0.0,
            strata_key("high_end", 3): float(high - high_candidate),
            strata_key("high_end", 7): float(high_candidate),
        }
        for v in (3, 7):
            for name in ("accuracy",):
                metrics[f"eval.v{v}.{name}.device_mean"] = 0.7
                metrics[f"eval.v{v}.{name}.device_se"] = 0.01
        rounds.append(metrics)
    state = analyze(spec, rounds)
    assert not state.srm.flagged
    assert state.srm.observed[0] == sum(int(r["eval.v3.devices"]) for r in rounds)
    # The same counts judged by the default split alone would be a mismatch.
    assert srm_check(list(state.srm.observed), [0.5, 0.5]).flagged


def test_a_devices_label_is_its_stratum_when_the_spec_names_it() -> None:
    spec = parse_experiment_spec(experiment())
    assert stratum_label(spec, "low_end") == "low_end"
    assert stratum_label(spec, "tablet") == stratum_label(spec, None) == DEFAULT_STRATUM


# ---------------------------------------------------------------- where strata are refused

TASK = """\
name: ab
kind: evaluate
model: {architecture: mlp, arguments: {input_dim: 64, hidden: [8], num_classes: 10}}
rounds: 3
clients_per_round: 4
min_reports: 3
evaluate:
  source_task: t-1
  experiment:
    arms: [{name: control, weight: 0.5, version: 0}, {name: candidate, weight: 0.5, version: 1}]
    primary_metric: {name: accuracy, direction: increase}
    mde: 0.05
    alpha: 0.05
    horizon_rounds: 3
    salt: s
    strata: {low_end: {control: 1.0}}
"""


def test_a_coordinator_experiment_takes_strata() -> None:
    spec = parse_task_yaml(TASK, source="ab.yaml")
    assert spec.evaluate.experiment is not None
    assert spec.evaluate.experiment.strata == {"low_end": (1.0, 0.0)}


def test_strata_under_secure_aggregation_are_refused_naming_the_field() -> None:
    with pytest.raises(TaskSpecError, match="evaluate.experiment.strata"):
        parse_task_yaml(TASK + "secure_aggregation: {clip: 1.0}\n", source="ab.yaml")


def test_strata_with_partitioned_training_are_refused_naming_the_field() -> None:
    raw = experiment(partition_training=True)
    raw["arms"] = [{"name": "control", "weight": 0.5, "training": {"local.epochs": 1}},
                   {"name": "candidate", "weight": 0.5, "training": {"local.epochs": 2}}]
    with pytest.raises(ExperimentSpecError, match="partition_training") as info:
        parse_training_arms(raw, task_rounds=4, default_devices_per_round=10)
    assert info.value.field == "strata"


def test_fedctl_agent_run_refuses_a_bad_stratum_before_starting(
        tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from fedctl.main import main

    rc = main(["agent", "run", "--coordinator", "localhost:1", "--data",
               "synthetic:shard=0/1", "--state-dir", str(tmp_path), "--stratum", "bad name"])
    assert rc == 2
    assert "--stratum must be letters, digits, _ or - only" in capsys.readouterr().err


def test_a_training_experiment_reads_device_strata_for_simulations_only() -> None:
    raw = experiment(device_strata={"low_end": 0.3, "high_end": 0.5})
    raw["arms"] = [{"name": "control", "weight": 0.5, "training": {"local.epochs": 1}},
                   {"name": "candidate", "weight": 0.5, "training": {"local.epochs": 2}}]
    arms = parse_training_arms(raw, task_rounds=4, default_devices_per_round=10)
    assert arms.device_strata == (("low_end", 0.3), ("high_end", 0.5))
    assert arms.spec.strata["high_end"] == (0.2, 0.8)
    del raw["strata"]
    with pytest.raises(ExperimentSpecError, match="needs strata") as info:
        parse_training_arms(raw, task_rounds=4, default_devices_per_round=10)
    assert info.value.field == "device_strata"
