"""``fedctl experiment``, through a parser built with :func:`fedctl.experiment.register`: a bad
experiment file is refused before any coordinator is called, naming the file and the field;
a task file without an experiment is not launched as one; and the results document says how
a task ended that no decision stopped."""

from __future__ import annotations

import argparse
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedctl")
    sub = p.add_subparsers(dest="command", required=True)

    def add_coordinator(q: argparse.ArgumentParser) -> None:
        q.add_argument("--coordinator", default="127.0.0.1:1")

    register(sub, add_coordinator, no_admin)  # type: ignore[arg-type]
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
    path = tmp_path / "ab.yaml"
    path.write_text(GOOD.replace(good, bad, 1))
    error = launch(path, "--source-task", "train-1")
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
