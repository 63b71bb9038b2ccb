"""Experiments whose arms differ by training configuration (core.experiments.training): the
same ``simulation.experiment`` section means the same arms in ``fedctl simulate`` and on a
coordinator: arms with the same configuration share one training run, each arm's model is
its run's version after its ``trained_rounds``, and the coordinator's comparison task names
each arm's training task and version. Bad sections are errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from core.experiments import ExperimentSpecError, TrafficSplit, assign_arm
from core.experiments.training import (
    apply_training,
    arm_admits,
    comparison_task,
    group_name,
    group_task,
    parse_training_arms,
    simulation_only,
    training_groups,
    training_mismatch,
)
from core.taskspec import spec_from_dict
from core.types import TaskKind

TASK: dict[str, Any] = {
    "name": "ab-train",
    "seed": 0,
    "model": {"architecture": "logistic_regression",
              "arguments": {"input_dim": 64, "num_classes": 10}},
    "rounds": 4,
    "clients_per_round": 10,
    "over_selection": 1.0,
    "min_reports": 5,
    "local": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.05},
    "server": {"kind": "fedavg", "learning_rate": 1.0},
}


def section(*arms: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"arms": list(arms), "primary_metric": {"name": "accuracy", "direction": "increase"},
            "guardrails": [{"metric": "loss", "max_increase": 0.1}],
            "mde": 0.05, "alpha": 0.05, "horizon_rounds": 3, "salt": "s-1", **extra}


def parse(raw: dict[str, Any]) -> Any:
    return parse_training_arms(raw, task_rounds=4, default_devices_per_round=10,
                               max_devices=30)


CONFIG_ARMS = section({"name": "control", "weight": 0.5},
                      {"name": "fast", "weight": 0.5,
                       "training": {"local": {"learning_rate": 0.2}, "local.epochs": 2}})


def test_where_arms_name_configurations_every_arm_trains_the_tasks_rounds_by_default(
        ) -> None:
    arms = parse(CONFIG_ARMS)
    assert arms.trained_rounds == (4, 4)
    assert arms.training == ((), (("local.epochs", 2), ("local.learning_rate", 0.2)))
    assert arms.devices_per_round == 10
    assert arms.spec.arm_names == ("control", "fast")


def test_arms_with_the_same_configuration_share_one_training_run() -> None:
    arms = parse(section({"name": "short", "weight": 0.25, "trained_rounds": 1},
                         {"name": "long", "weight": 0.25, "trained_rounds": 3},
                         {"name": "fast", "weight": 0.5, "training": {"server.learning_rate":
                                                                       1.5}}))
    groups = training_groups(arms)
    assert [(g.training, g.rounds, g.arms) for g in groups] == [
        ((), 3, (0, 1)), ((("server.learning_rate", 1.5),), 4, (2,))]
    assert group_name("ab", arms, groups[0]) == "ab-short+long"


def test_an_arms_task_is_the_file_task_with_its_fields_changed_and_validates() -> None:
    arms = parse(CONFIG_ARMS)
    fast = training_groups(arms)[1]
    data = group_task({**TASK, "simulation": {"population": {}}}, fast, name="ab-fast")
    assert "simulation" not in data and data["name"] == "ab-fast" and data["rounds"] == 4
    spec = spec_from_dict(data)
    assert spec.local.learning_rate == 0.2 and spec.local.epochs == 2
    assert spec.local.batch_size == 10  # untouched fields stay the task's
    assert TASK["local"]["learning_rate"] == 0.05  # the file's data is not changed


def test_the_comparison_task_names_each_arms_training_task_and_version() -> None:
    arms = parse(section({"name": "short", "weight": 0.5, "trained_rounds": 1},
                         {"name": "long", "weight": 0.5, "trained_rounds": 4},
                         devices_per_round=6))
    spec = spec_from_dict(comparison_task({**TASK, "population": "phones"}, arms,
                                          ["t-1", "t-1"]))
    assert spec.kind is TaskKind.EVALUATE
    assert spec.rounds == 3 and spec.clients_per_round == 6 and spec.population == "phones"
    experiment = spec.evaluate.experiment
    assert experiment is not None and experiment.salt == "s-1"
    assert [(a.name, a.task, a.task_version, a.version) for a in experiment.arms] == [
        ("short", "t-1", 1, 0), ("long", "t-1", 4, 1)]
    with pytest.raises(ValueError, match="2 arms need as many task ids"):
        comparison_task(TASK, arms, ["t-1"])


def test_a_device_is_in_exactly_the_arm_the_comparison_assigns_it() -> None:
    weights = (0.3, 0.7)
    for i in range(50):
        device = f"d-{i}"
        arm = assign_arm(device, salt="s-1", split=TrafficSplit(list(weights)))
        assert [arm_admits(device, salt="s-1", weights=weights, arm=a) for a in (0, 1)] == [
            arm == 0, arm == 1]


def test_fields_only_a_simulation_runs_are_found() -> None:
    arms = parse(section({"name": "a", "weight": 0.5, "training": {"local.epochs": 2}},
                         {"name": "b", "weight": 0.5,
                          "training": {"simulation.algorithm": {"kind": "fedprox",
                                                                "mu": 0.1}}}))
    assert simulation_only(arms) == (1, "simulation.algorithm.kind")
    assert simulation_only(parse(CONFIG_ARMS)) is None


@pytest.mark.parametrize(("raw", "field"), [
    (section({"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5,
                                            "trained_rounds": 2}),
     "arms[0].trained_rounds"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 5},
             {"name": "b", "weight": 0.5, "trained_rounds": 1}), "arms[0].trained_rounds"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 1},
             {"name": "b", "weight": 0.5, "training": {"model.arguments.hidden": [3]}}),
     "arms[1].training.model.arguments.hidden"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 1},
             {"name": "b", "weight": 0.5, "training": {"local.learning_rate": -1}}),
     "arms[1].training.local.learning_rate"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 1},
             {"name": "b", "weight": 0.5, "training": {"local.epochs": 1.5}}),
     "arms[1].training.local.epochs"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 1},
             {"name": "b", "weight": 0.5, "training": {}}), "arms[1].training"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 1},
             {"name": "b", "weight": 0.6, "trained_rounds": 2}), "arms"),
    (section({"name": "a", "weight": 0.5, "trained_rounds": 1},
             {"name": "b", "weight": 0.5, "trained_rounds": 2}, devices_per_round=31),
     "devices_per_round"),
])
def test_a_bad_section_names_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ExperimentSpecError) as info:
        parse(raw)
    assert info.value.field == field


def test_apply_training_refuses_a_path_through_a_value() -> None:
    with pytest.raises(ExperimentSpecError, match="local is not a section"):
        apply_training({"local": 3}, (("local.epochs", 2),))


def test_a_simulated_experiment_trains_each_configuration_and_a_better_one_wins(
        tmp_path: Path) -> None:
    """In simulation, an arm whose configuration trains well (learning rate 0.5) beats one
    that barely trains (1e-4) on the devices' held-out data, and the summary says which
    configuration each arm ran."""
    from simulations.experiment import load_experiment_file, run_experiment, summary

    raw = section({"name": "slow", "weight": 0.5, "training": {"local.learning_rate": 1e-4}},
                  {"name": "fast", "weight": 0.5, "training": {"local.learning_rate": 0.5}},
                  devices_per_round=10)
    raw["guardrails"] = []
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump({**TASK, "simulation": {
        "population": {"devices": 30, "data": "digits:dirichlet=100"},
        "experiment": raw}}), encoding="utf-8")
    config, experiment = load_experiment_file(path)
    assert [c.local.learning_rate for c in experiment.configs] == [1e-4, 0.5]
    history = run_experiment(config, experiment)
    result = summary(config, experiment, history)
    assert result["decision"]["action"] == "stop_success", result["decision"]
    assert result["decision"]["arm"] == "fast"
    assert result["arms"]["fast"]["training"] == {"local.learning_rate": 0.5}


def test_a_simulated_arm_whose_configuration_breaks_the_task_names_the_field(
        tmp_path: Path) -> None:
    from simulations.errors import SimulationConfigError
    from simulations.experiment import load_experiment_file

    raw = section({"name": "a", "weight": 0.5},
                  {"name": "b", "weight": 0.5, "training": {"local.optimizer": "lbfgs"}})
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump({**TASK, "simulation": {
        "population": {"devices": 30, "data": "digits:dirichlet=100"},
        "experiment": raw}}), encoding="utf-8")
    with pytest.raises(SimulationConfigError) as info:
        load_experiment_file(path)
    assert info.value.field == "simulation.experiment.arms[1].training"
    assert "local.optimizer" in str(info.value) and str(path) in str(info.value)


def test_a_task_trained_otherwise_than_its_arm_is_told_apart() -> None:
    from core.taskspec import spec_to_dict

    arms = parse(CONFIG_ARMS)
    control, fast = (spec_to_dict(spec_from_dict(group_task(TASK, g, name="t")))
                     for g in training_groups(arms))
    assert training_mismatch(fast, fast) == []
    assert training_mismatch(fast, control) == [
        "local.learning_rate is 0.05, the arm needs 0.2", "local.epochs is 1, the arm needs 2"]
