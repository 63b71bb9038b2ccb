"""Training partitioned by arm (``partition_training: true``, core.experiments.training): the
arm filter (``eligibility.arm``, :class:`core.types.ArmFilter`) admits exactly the devices the
experiment's assignment gives its arm, the one the comparison evaluates by, so a device trains
and evaluates the same arm; every arm trains in a run of its own; a task file's filter is
checked naming the file and the field; and in simulation an arm's run only ever draws its
arm's devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from core.evaluation.plan import plan_for
from core.experiments import ExperimentSpecError, TrafficSplit, assign_arm, assign_arms
from core.experiments.training import (
    arm_admits,
    arm_filter,
    arm_members,
    comparison_task,
    group_name,
    group_task,
    parse_training_arms,
    training_groups,
    training_mismatch,
)
from core.taskspec import TaskSpecError, load_task_file, spec_from_dict, spec_to_dict
from core.types import ArmFilter, Eligibility

TASK: dict[str, Any] = {
    "name": "ab-train",
    "seed": 0,
    "model": {"architecture": "logistic_regression",
              "arguments": {"input_dim": 64, "num_classes": 10}},
    "rounds": 4,
    "clients_per_round": 5,
    "over_selection": 1.0,
    "min_reports": 3,
    "local": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.05},
    "server": {"kind": "fedavg", "learning_rate": 1.0},
}
DEVICES = [f"device-{i}" for i in range(2000)]


def section(*arms: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"arms": list(arms), "primary_metric": {"name": "accuracy", "direction": "increase"},
            "mde": 0.05, "alpha": 0.05, "horizon_rounds": 3, "salt": "s-1", **extra}


def parse(raw: dict[str, Any]) -> Any:
    return parse_training_arms(raw, task_rounds=4, default_devices_per_round=10,
                               max_devices=60)


THREE_ARMS = section({"name": "control", "weight": 0.2},
                     {"name": "fast", "weight": 0.5, "training": {"local.learning_rate": 0.2}},
                     {"name": "early", "weight": 0.3, "trained_rounds": 2},
                     partition_training=True)


# ------------------------------------------------------------------------ the filter


def test_each_arms_filter_admits_exactly_the_devices_assign_arm_gives_that_arm() -> None:
    arms = parse(THREE_ARMS)
    assigned = assign_arms(DEVICES, salt="s-1", split=TrafficSplit([0.2, 0.5, 0.3]))
    filters = [arm_filter(arms, i) for i in range(3)]
    assert filters[1] == ArmFilter("s-1", (0.2, 0.5, 0.3), 1)
    for i, f in enumerate(filters):
        admitted = np.array([f.admits(d) for d in DEVICES])
        assert np.array_equal(admitted, assigned == i)
        assert np.array_equal(arm_members(f, DEVICES), admitted)  # the vectorized form
        assert [arm_admits(d, salt="s-1", weights=(0.2, 0.5, 0.3), arm=i)
                for d in DEVICES[:100]] == admitted[:100].tolist()
    # The arms partition the devices: each is admitted by exactly one arm's task.
    assert np.array_equal(sum(arm_members(f, DEVICES).astype(int) for f in filters),
                          np.ones(len(DEVICES), dtype=int))


@settings(max_examples=50, deadline=None)
@given(salt=st.text(min_size=1, max_size=20),
       raw=st.lists(st.integers(0, 10), min_size=2, max_size=5).filter(lambda w: sum(w) > 0),
       ids=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=20))
def test_a_filter_agrees_with_assign_arm_for_any_salt_split_and_ids(
        salt: str, raw: list[int], ids: list[str]) -> None:
    weights = tuple(w / sum(raw) for w in raw)
    split = TrafficSplit(weights)
    for index in range(len(weights)):
        f = ArmFilter(salt, weights, index)
        expected = [assign_arm(d, salt=salt, split=split) == index for d in ids]
        assert [f.admits(d) for d in ids] == expected
        assert arm_members(f, ids).tolist() == expected


def test_the_filter_keeps_its_salt_out_of_messages() -> None:
    assert "s-secret" not in repr(ArmFilter("s-secret", (0.5, 0.5), 0))
    assert "s-secret" not in str(Eligibility(arm=ArmFilter("s-secret", (0.5, 0.5), 0)))


def test_the_comparison_evaluates_each_device_on_the_arm_it_trained() -> None:
    """The comparison task's evaluation plan (what every device's plan carries) gives each
    device the model version of the arm whose training task admitted it."""
    arms = parse(THREE_ARMS)
    groups = training_groups(arms)
    comparison = spec_from_dict(comparison_task(TASK, arms, ["t0", "t1", "t2"]))
    experiment = comparison.evaluate.experiment
    assert experiment is not None
    versions = tuple(a.version for a in experiment.arms if a.version is not None)
    plan = plan_for(comparison.evaluate, versions)
    for d in DEVICES[:300]:
        trained = [g.arms[0] for g in groups if g.arm_filter is not None
                   and g.arm_filter.admits(d)]
        assert len(trained) == 1
        assert plan.version_for(d) == versions[trained[0]]


# ------------------------------------------------------------- the section and the tasks


def test_partitioned_arms_train_in_runs_of_their_own_each_with_its_filter() -> None:
    arms = parse(THREE_ARMS)
    assert arms.partition_training
    groups = training_groups(arms)
    # control and early have the same training but different devices: no shared run.
    assert [(g.training, g.rounds, g.arms) for g in groups] == [
        ((), 4, (0,)), ((("local.learning_rate", 0.2),), 4, (1,)), ((), 2, (2,))]
    assert [g.arm_filter for g in groups] == [arm_filter(arms, i) for i in range(3)]
    assert [group_name("ab", arms, g) for g in groups] == ["ab-control", "ab-fast", "ab-early"]


def test_without_the_option_arms_train_on_everyone_as_before() -> None:
    raw = {k: v for k, v in THREE_ARMS.items() if k != "partition_training"}
    arms = parse(raw)
    assert not arms.partition_training
    groups = training_groups(arms)
    assert [(g.arms, g.arm_filter) for g in groups] == [((0, 2), None), ((1,), None)]
    assert spec_from_dict(group_task(TASK, groups[0], name="t")).eligibility.arm is None


def test_an_arms_task_carries_its_filter_beside_the_tasks_own_eligibility() -> None:
    arms = parse(THREE_ARMS)
    fast = training_groups(arms)[1]
    data = group_task({**TASK, "eligibility": {"require_charging": True}}, fast, name="t")
    spec = spec_from_dict(data)
    assert spec.eligibility == Eligibility(require_charging=True,
                                           arm=ArmFilter("s-1", (0.2, 0.5, 0.3), 1))
    assert spec.local.learning_rate == 0.2
    assert spec_from_dict(spec_to_dict(spec)) == spec  # stored and read back: the same


def test_a_task_that_admits_other_devices_than_its_arms_is_told_apart() -> None:
    arms = parse(THREE_ARMS)
    control, fast, _ = (spec_to_dict(spec_from_dict(group_task(TASK, g, name="t")))
                        for g in training_groups(arms))
    plain = spec_to_dict(spec_from_dict({**TASK, "name": "t"}))
    assert training_mismatch(control, control) == []
    assert training_mismatch(control, plain) == [
        "eligibility.arm admit every arm's devices, the arm needs it to admit arm 0's "
        "devices of the split [0.2, 0.5, 0.3] under the experiment's salt"]
    other_arm = {**fast, "local": control["local"]}
    assert training_mismatch(control, other_arm) == [
        "eligibility.arm admit arm 1's devices of the split [0.2, 0.5, 0.3] under the "
        "experiment's salt, the arm needs it to admit arm 0's devices of the split "
        "[0.2, 0.5, 0.3] under the experiment's salt"]


@pytest.mark.parametrize(("extra", "arm", "field"), [
    ({"partition_training": "yes"}, None, "partition_training"),
    ({"partition_training": 1}, None, "partition_training"),
    ({"partition_training": True}, {"name": "b", "weight": 0.0, "trained_rounds": 2},
     "arms[1].weight"),
])
def test_a_bad_partition_option_names_the_field(extra: dict[str, Any],
                                                arm: dict[str, Any] | None,
                                                field: str) -> None:
    arms = [{"name": "a", "weight": 1.0 if arm else 0.5, "trained_rounds": 1},
            arm or {"name": "b", "weight": 0.5, "trained_rounds": 2}]
    with pytest.raises(ExperimentSpecError) as info:
        parse(section(*arms, **extra))
    assert info.value.field == field


# ------------------------------------------------------------- eligibility.arm by hand


def task_file(tmp_path: Path, arm: Any) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({**TASK, "eligibility": {"arm": arm}}), encoding="utf-8")
    return path


def test_a_hand_written_filter_is_read_as_the_launch_writes_it(tmp_path: Path) -> None:
    spec = load_task_file(task_file(tmp_path, {"salt": "s-1", "weights": [0.25, 0.75],
                                               "index": 1}))
    assert spec.eligibility.arm == ArmFilter("s-1", (0.25, 0.75), 1)
    assert load_task_file(task_file(tmp_path, None)).eligibility.arm is None


@pytest.mark.parametrize(("arm", "field", "message"), [
    ({"salt": " ", "weights": [0.5, 0.5], "index": 0}, "eligibility.arm.salt", "non-empty"),
    ({"weights": [0.5, 0.5], "index": 0}, "eligibility.arm.salt", "is required"),
    ({"salt": "s", "weights": [1.0], "index": 0}, "eligibility.arm.weights",
     "2 to 64 arm weights"),
    ({"salt": "s", "weights": [0.5, 0.6], "index": 0}, "eligibility.arm.weights",
     "must sum to 1"),
    ({"salt": "s", "weights": [-0.5, 1.5], "index": 0}, "eligibility.arm.weights", ">= 0"),
    ({"salt": "s", "weights": "half", "index": 0}, "eligibility.arm.weights",
     "expected a list"),
    ({"salt": "s", "weights": [0.5, 0.5], "index": 2}, "eligibility.arm.index", "0 to 1"),
    ({"salt": "s", "weights": [0.5, 0.5], "index": -1}, "eligibility.arm.index", "0 to 1"),
    ({"salt": "s", "weights": [1.0, 0.0], "index": 1}, "eligibility.arm.index",
     "weight 0: no device would be admitted"),
    ({"salt": "s", "weights": [0.5, 0.5], "index": 0, "name": "b"}, "eligibility.arm.name",
     "unknown field"),
])
def test_a_bad_filter_in_a_task_file_names_the_file_and_field(
        tmp_path: Path, arm: dict[str, Any], field: str, message: str) -> None:
    path = task_file(tmp_path, arm)
    with pytest.raises(TaskSpecError) as info:
        load_task_file(path)
    assert info.value.field == field
    assert str(info.value).startswith(f"{path}: field '{field}'")
    assert message in info.value.message


# ----------------------------------------------------------------------- in simulation


def experiment_file(tmp_path: Path, **extra: Any) -> Path:
    raw = section({"name": "slow", "weight": 0.5, "training": {"local.learning_rate": 1e-4}},
                  {"name": "fast", "weight": 0.5, "training": {"local.learning_rate": 0.5}},
                  devices_per_round=10, partition_training=True, **extra)
    path = tmp_path / "ab.yaml"
    path.write_text(yaml.safe_dump({**TASK, "simulation": {
        "population": {"devices": 60, "data": "digits:dirichlet=100"},
        "experiment": raw}}), encoding="utf-8")
    return path


def test_a_simulated_arms_run_only_ever_draws_its_arms_devices(tmp_path: Path) -> None:
    """The engine's own round planning (who is online, who is admitted) over the arm's run:
    every admitted device is the arm's, in every round and retry."""
    from simulations.devices import plan_round
    from simulations.engine import Simulation
    from simulations.experiment import device_id, load_experiment_file, train_only

    config, experiment = load_experiment_file(experiment_file(tmp_path))
    fast = training_groups(experiment.arms)[1]
    assert fast.arm_filter is not None
    sim = Simulation(experiment.configs[1])
    members = train_only(sim, fast.arm_filter)
    assert 10 < len(members) < 50  # about half of the 60
    expected = [d for d in range(60) if fast.arm_filter.admits(device_id(d))]
    assert members.tolist() == expected
    admitted: set[int] = set()
    for r in range(1, 11):
        plan = plan_round(r, profiles=sim.profiles, sizes=sim.table.sizes,
                          selection=sim.config.selection, local=sim.config.local,
                          straggler_fraction=0.0, seed=sim.config.seed)
        admitted.update(plan.admitted)
        assert plan.available <= len(members)
    assert admitted and admitted <= set(expected)


def test_a_partitioned_simulated_experiment_trains_each_arm_on_its_devices_and_decides(
        tmp_path: Path) -> None:
    from simulations.experiment import (
        ExperimentRunner,
        device_id,
        load_experiment_file,
        summary,
    )

    config, experiment = load_experiment_file(experiment_file(tmp_path))
    assert experiment.partition_training
    runner = ExperimentRunner(config, experiment)
    slow, fast = runner.trained_on
    assert slow is not None and fast is not None
    assert not set(slow.tolist()) & set(fast.tolist())
    assert sorted([*slow.tolist(), *fast.tolist()]) == list(range(60))
    history = list(runner.rounds())
    # Every device evaluated the arm it trained.
    for device, arm in runner.assigned.items():
        assert device in (slow, fast)[arm], device_id(device)
    result = summary(config, experiment, history)
    assert result["partition_training"] is True
    assert result["decision"]["action"] == "stop_success", result["decision"]
    assert result["decision"]["arm"] == "fast"


def test_a_simulated_experiment_refuses_a_hand_written_filter(tmp_path: Path) -> None:
    from simulations.errors import SimulationConfigError
    from simulations.experiment import load_experiment_file

    path = experiment_file(tmp_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["eligibility"] = {"arm": {"salt": "s", "weights": [0.5, 0.5], "index": 0}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(SimulationConfigError) as info:
        load_experiment_file(path)
    assert info.value.field == "eligibility.arm" and str(path) in str(info.value)
