"""``fedctl experiment``, through a parser built with :func:`fedctl.experiment.register`: a bad
experiment file is refused before any coordinator is called, naming the file and the field;
a task file without an experiment is not launched as one; and the results document says how
a task ended that no decision stopped."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from fedctl.errors import CliError
from fedctl.experiment import register, results_document
from protos.fedcoord.v1 import admin_pb2

GOOD = """\
name: ab
kind: evaluate
model: {architecture: logistic_regression, arguments: {input_dim: 4, num_classes: 3}}
rounds: 3
clients_per_round: 8
min_reports: 2
evaluate:
  experiment:
    arms:
      - {name: control, weight: 0.5, version: 0}
      - {name: candidate, weight: 0.5, version: 1}
    primary_metric: {name: accuracy, direction: increase}
    mde: 0.02
    alpha: 0.05
    horizon_rounds: 3
"""


def no_admin(args: argparse.Namespace) -> object:
    raise AssertionError("a refused file must not reach the coordinator")


def parser(admin: Callable[[argparse.Namespace], object] = no_admin
           ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedctl")
    sub = p.add_subparsers(dest="command", required=True)

    def add_coordinator(q: argparse.ArgumentParser) -> None:
        q.add_argument("--coordinator", default="127.0.0.1:1")

    register(sub, add_coordinator, admin)  # type: ignore[arg-type]
    return p


def launch(path: Path, *extra: str) -> CliError:
    args = parser().parse_args(["experiment", "launch", str(path), *extra])
    with pytest.raises(CliError) as info:
        args.func(args)
    return info.value


@pytest.mark.parametrize(("good", "bad", "field"), [
    ("weight: 0.5, version: 1", "weight: 0.7, version: 1", "evaluate.experiment.arms"),
    ("version: 1}", "version: one}", "evaluate.experiment.arms[1].version"),
    ("name: accuracy", "name: f1", "evaluate.experiment.primary_metric.name"),
    ("horizon_rounds: 3", "horizon_rounds: 4", "evaluate.experiment.horizon_rounds"),
    ("mde: 0.02", "mde: -1", "evaluate.experiment.mde"),
])
def test_a_bad_experiment_file_is_refused_naming_the_file_and_field(
        tmp_path: Path, good: str, bad: str, field: str) -> None:
    refused_naming(tmp_path, GOOD.replace(good, bad, 1), field, "--source-task", "train-1")


def refused_naming(tmp_path: Path, text: str, field: str, *extra: str) -> None:
    """The file ``text`` is refused before any coordinator is called, naming it and
    ``field``."""
    path = tmp_path / "ab.yaml"
    path.write_text(text)
    error = launch(path, *extra)
    assert error.exit_code == 2
    assert str(error).startswith(f"{path}: field '{field}'"), str(error)


def test_a_task_file_without_an_experiment_is_not_launched_as_one(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(GOOD.split("  experiment:")[0] + "  versions: [0]\n")
    error = launch(path)
    assert error.exit_code == 2
    assert f"{path}: field 'evaluate.experiment': is required" in str(error)


def test_the_results_say_how_a_task_ended_that_no_decision_stopped(tmp_path: Path) -> None:
    from core.taskspec import parse_task_yaml

    spec = parse_task_yaml(GOOD)
    assert spec.evaluate.experiment is not None
    task = admin_pb2.Task(task_id="ab-1", state="cancelled", reason="cancelled by an operator")
    doc = results_document(task, spec.evaluate.experiment, None)
    assert doc["decision"] == {"action": "ended_cancelled",
                               "reason": "cancelled by an operator"}
    running = admin_pb2.Task(task_id="ab-1", state="running")
    assert results_document(running, spec.evaluate.experiment, None)["decision"][
        "reason"] == "no committed round yet"


# ------------------------------------------- a training task file's simulation.experiment

TRAINING = """\
name: ab-train
model: {architecture: logistic_regression, arguments: {input_dim: 4, num_classes: 3}}
rounds: 6
clients_per_round: 8
min_reports: 2
local: {epochs: 1, batch_size: 10, optimizer: sgd, learning_rate: 0.05}
simulation:
  population: {devices: 30, data: "digits:dirichlet=0.5"}
  experiment:
    arms:
      - {name: control, weight: 0.4}
      - {name: fast, weight: 0.3, training: {local.learning_rate: 0.2}}
      - {name: early, weight: 0.3, trained_rounds: 2}
    primary_metric: {name: accuracy, direction: increase}
    mde: 0.02
    alpha: 0.05
    horizon_rounds: 3
    salt: ab-salt
    devices_per_round: 6
"""


class FakeAdmin:
    """Stands in for the coordinator's admin API: records the created tasks (each running
    until ``finish`` completes it)."""

    def __init__(self) -> None:
        from core.types import TaskSpec

        self.created: list[tuple[str, TaskSpec]] = []
        self.states: dict[str, str] = {}

    def __enter__(self) -> FakeAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def create_task(self, spec: object) -> admin_pb2.Task:
        from core.types import TaskSpec
        from protos.convert import task_spec_to_proto

        assert isinstance(spec, TaskSpec)
        task_id = f"t{len(self.created)}"
        self.created.append((task_id, spec))
        self.states[task_id] = "completed"  # trains instantly
        return admin_pb2.Task(task_id=task_id, state="running",
                              spec=task_spec_to_proto(spec))

    def get_task(self, task_id: str) -> admin_pb2.Task:
        from protos.convert import task_spec_to_proto

        spec = dict(self.created)[task_id]
        return admin_pb2.Task(task_id=task_id, state=self.states[task_id],
                              spec=task_spec_to_proto(spec), rounds_committed=spec.rounds)


def run(admin: FakeAdmin, *argv: str) -> int:
    args = parser(lambda _: admin).parse_args(["experiment", "launch", *argv, "--poll-s", "0"])
    result = args.func(args)
    assert isinstance(result, int)
    return result


def test_a_training_file_launches_one_task_per_configuration_then_the_comparison(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(TRAINING)
    admin = FakeAdmin()
    assert run(admin, str(path)) == 0
    (control_id, control), (fast_id, fast), (cmp_id, comparison) = admin.created
    # control and early share the task as written (6 rounds); fast runs its own lr.
    assert (control.name, control.rounds, control.local.learning_rate) == (
        "ab-train-control+early", 6, 0.05)
    assert (fast.name, fast.rounds, fast.local.learning_rate) == ("ab-train-fast", 6, 0.2)
    experiment = comparison.evaluate.experiment
    assert experiment is not None and experiment.salt == "ab-salt"
    assert [(a.name, a.task, a.task_version) for a in experiment.arms] == [
        ("control", control_id, 6), ("fast", fast_id, 6), ("early", control_id, 2)]
    assert comparison.clients_per_round == 6 and comparison.rounds == 3
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == cmp_id  # the experiment's id, last
    assert f"arm(s) fast: training task {fast_id} (6 rounds)" in out


def test_no_wait_launches_the_training_and_arm_tasks_launches_the_comparison_later(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(TRAINING)
    admin = FakeAdmin()
    assert run(admin, str(path), "--no-wait") == 0
    assert [t for t, _ in admin.created] == ["t0", "t1"]
    assert f"fedctl experiment launch {path} --arm-tasks t0,t1" in capsys.readouterr().out
    assert run(admin, str(path), "--arm-tasks", "t0,t1") == 0
    assert len(admin.created) == 3 and admin.created[2][1].evaluate.experiment is not None
    with pytest.raises(CliError, match=r"task t1 is not the training of arm\(s\) control, "
                                       r"early: local.learning_rate is 0.2, the arm needs "
                                       r"0.05"):
        run(admin, str(path), "--arm-tasks", "t1,t0")
    with pytest.raises(CliError, match=r"--arm-tasks: .* trains 2 run\(s\)"):
        run(admin, str(path), "--arm-tasks", "t0")


def test_a_training_task_that_fails_launches_no_comparison(tmp_path: Path) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(TRAINING)
    admin = FakeAdmin()
    real_create = admin.create_task

    def failing(spec: object) -> admin_pb2.Task:
        task = real_create(spec)
        admin.states[task.task_id] = "failed"
        return task

    admin.create_task = failing  # type: ignore[method-assign]
    with pytest.raises(CliError, match="training task t0 of arm.s. control, early ended "
                                       "failed: .*the comparison was not launched"):
        run(admin, str(path))
    assert len(admin.created) == 2


@pytest.mark.parametrize(("good", "bad", "field"), [
    ("training: {local.learning_rate: 0.2}", "training: {local.learning_rate: 0}",
     "simulation.experiment.arms[1].training.local.learning_rate"),
    ("training: {local.learning_rate: 0.2}", "training: {simulation.algorithm.mu: 0.1}",
     "simulation.experiment.arms[1].training.simulation.algorithm.mu"),
    ("training: {local.learning_rate: 0.2}", "training: {local.optimizer: lbfgs}",
     "simulation.experiment.arms[1].training"),
    ("trained_rounds: 2", "trained_rounds: 7", "simulation.experiment.arms[2].trained_rounds"),
    ("weight: 0.4", "weight: 0.5", "simulation.experiment.arms"),
    ("horizon_rounds: 3", "horizon_rounds: 0", "simulation.experiment.horizon_rounds"),
    ("min_reports: 2", "min_reports: 20", "min_reports"),
])
def test_a_bad_training_experiment_file_launches_nothing_and_names_the_field(
        tmp_path: Path, good: str, bad: str, field: str) -> None:
    refused_naming(tmp_path, TRAINING.replace(good, bad, 1), field)


PARTITIONED = TRAINING.replace("    devices_per_round: 6\n",
                               "    devices_per_round: 6\n    partition_training: true\n")


def test_a_partitioned_experiment_trains_each_arm_in_its_own_task_on_its_arms_devices(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``partition_training: true``: one training task per arm (control and early no longer
    share one: they train on different devices), each admitting only its arm's devices
    under the experiment's salt and split, which the comparison assigns by."""
    from core.types import ArmFilter

    path = tmp_path / "ab.yaml"
    path.write_text(PARTITIONED)
    admin = FakeAdmin()
    assert run(admin, str(path)) == 0
    *training, (_, comparison) = admin.created
    assert [(s.name, s.rounds) for _, s in training] == [
        ("ab-train-control", 6), ("ab-train-fast", 6), ("ab-train-early", 2)]
    assert [s.eligibility.arm for _, s in training] == [
        ArmFilter("ab-salt", (0.4, 0.3, 0.3), i) for i in range(3)]
    experiment = comparison.evaluate.experiment
    assert experiment is not None and experiment.salt == "ab-salt"
    assert [(a.task, a.weight) for a in experiment.arms] == [
        (task_id, w) for (task_id, _), w in zip(training, (0.4, 0.3, 0.3), strict=True)]
    assert comparison.eligibility.arm is None  # every device evaluates (its own arm)
    assert "arm(s) fast: training task t1 (6 rounds, on its arm's devices only)" in (
        capsys.readouterr().out)


def test_arm_tasks_of_a_partitioned_experiment_must_admit_only_their_arms_devices(
        tmp_path: Path) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(TRAINING)
    admin = FakeAdmin()
    assert run(admin, str(path), "--no-wait") == 0  # t0: control+early, t1: fast; no filter
    path.write_text(PARTITIONED)
    with pytest.raises(CliError, match=r"task t0 is not the training of arm\(s\) control: "
                                       r"eligibility.arm admit every arm's devices, the arm "
                                       r"needs it to admit arm 0's devices"):
        run(admin, str(path), "--arm-tasks", "t0,t1,t0")


@pytest.mark.parametrize(("good", "bad", "field"), [
    ("partition_training: true", "partition_training: sometimes",
     "simulation.experiment.partition_training"),
    ("weight: 0.4}", "weight: 0.7}", "simulation.experiment.arms"),
    ("rounds: 6\n", "rounds: 6\neligibility: {arm: {salt: s, weights: [0.5, 0.5], "
                    "index: 0}}\n", "eligibility.arm"),
])
def test_a_bad_partitioned_experiment_file_launches_nothing_and_names_the_field(
        tmp_path: Path, good: str, bad: str, field: str) -> None:
    refused_naming(tmp_path, PARTITIONED.replace(good, bad, 1), field)


def test_an_arm_without_devices_cannot_be_trained_by_its_devices(tmp_path: Path) -> None:
    text = (PARTITIONED.replace("weight: 0.4}", "weight: 0.7}", 1)
            .replace("name: early, weight: 0.3", "name: early, weight: 0.0", 1))
    refused_naming(tmp_path, text, "simulation.experiment.arms[2].weight")
