"""fedctl tune --coordinator: each trial a task on a real coordinator, served by a real agent
process; the pruner reads the committed rounds' federated evaluation (the devices evaluate
each round's starting model), a pruned trial's task is cancelled."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import ADMIN_TOKEN, CoordinatorProcess, shared_coordinator, start_agent, stop_all

from fedctl.tune import CoordinatorTrials, register
from simulations.tuning import TrialJob, TrialState

pytest.importorskip("optuna")
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    yield from shared_coordinator(tmp_path_factory)


TASK: dict[str, Any] = {
    "name": "tune-it", "seed": 0,
    "model": {"architecture": "logistic_regression",
              "arguments": {"input_dim": 64, "num_classes": 10}},
    "rounds": 3, "clients_per_round": 2, "min_reports": 2, "round_deadline_s": 60,
    "selection_window_s": 0.5,
    "local": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "learning_rate": 0.1},
    "server": {"kind": "fedavg", "learning_rate": 1.0},
    # Both: the federated evaluation (every selected device) is the curve.
    "evaluation": {"fraction": 1.0, "server_data": "digits:split=test"},
}


def test_trials_are_tasks_whose_federated_evaluation_is_the_curve_and_pruning_cancels(
        coordinator: CoordinatorProcess, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    study = {
        "name": "tune-it", "task": TASK, "trials": 3, "parallel": 2, "seed": 0,
        "objective": {"metric": "accuracy"}, "pruner": {"kind": "none"},
        "space": {"local.learning_rate": {"type": "float", "low": 0.01, "high": 0.5,
                                          "log": True},
                  "server.learning_rate": {"type": "float", "low": 0.5, "high": 1.0}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    # Four devices: two trials' tasks at once, two devices each.
    agent = start_agent(coordinator.target, "tuner", "digits:shard=0/4,dirichlet=0.5",
                        devices=4, log=tmp_path / "agent.log")
    try:
        parser = argparse.ArgumentParser(prog="fedctl")
        register(parser.add_subparsers())
        args = parser.parse_args(["tune", str(path), "--coordinator", coordinator.target,
                                  "--token", ADMIN_TOKEN, "--poll-s", "0.2", "--json",
                                  "--out", str(tmp_path / "out")])
        assert args.func(args) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["trials"] == 3 and summary["complete"] == 3, summary
        curves = json.loads((tmp_path / "out" / "study.json").read_text())["curves"]
        with coordinator.admin() as client:
            tasks = {t.spec.name: t for t in client.list_tasks()}
            for number in range(3):
                task = tasks[f"tune-it-trial-{number}"]
                assert task.state == "completed"
                rounds = [r for r in client.list_rounds(task.task_id) if r.state == "committed"]
                assert curves[str(number)] == [
                    [r.round_number, r.metrics["eval_accuracy"]] for r in rounds]
            assert summary["best"]["value"] == max(c[-1][1] for c in curves.values())

            # A trial the pruner stops at its first evaluated round: its task is cancelled.
            backend = CoordinatorTrials(client, poll_s=0.2)
            job = TrialJob(7, {}, {**TASK, "name": "tune-it-pruned", "rounds": 20})
            seen: list[tuple[int, int, float]] = []

            def prune_at_once(number: int, round_number: int, value: float) -> bool:
                seen.append((number, round_number, value))
                return True

            (outcome,) = backend.run_wave([job], prune_at_once, metric="accuracy")
            assert outcome.state is TrialState.PRUNED and outcome.rounds >= 1
            assert seen == [(7, 1, outcome.value)]
            pruned = {t.spec.name: t for t in client.list_tasks()}["tune-it-pruned"]
            assert pruned.state == "cancelled"
            assert pruned.rounds_committed < 20
    finally:
        stop_all([agent])
