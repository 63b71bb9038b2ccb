"""An A/B experiment end to end over gRPC: a coordinator process, one agent process of 32
devices and the engineer's ``fedctl experiment`` commands. A training task commits versions
1 to 3; an experiment of the initial model (control) against version 3 (candidate) runs as an
evaluation task where each device evaluates only its arm's version, stops with a decision and its
reason, and ``fedctl experiment status`` prints the table and writes the results JSON; the
same comparison launched from a training task file's ``simulation.experiment`` section (arms
by training rounds of the task trained here, ``--arm-tasks``) decides the same way; with
``partition_training`` each arm's training task selects only its arm's devices; a bad
experiment file is refused naming file and field; ``stop`` ends a running experiment.

The commands run in this process, through a parser built with
:func:`fedctl.experiment.register` and fedctl's own coordinator options and admin client
(the same code the ``fedctl`` executable runs once it registers the command)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import (
    ADMIN_TOKEN,
    CoordinatorProcess,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from core.experiments import TrafficSplit, assign_arm
from fedctl import experiment as experiment_cli
from fedctl.errors import CliError
from fedctl.main import _add_coordinator, _admin
from protos.convert import task_spec_from_proto

pytestmark = pytest.mark.integration

DEVICES = 32
EXPERIMENT = """\
name: it-ab
kind: evaluate
model:
  architecture: logistic_regression
  arguments: {{input_dim: 64, num_classes: 10}}
rounds: {rounds}
clients_per_round: {devices}
min_reports: 8
over_selection: 1.0
round_deadline_s: 60
selection_window_s: 1.0
evaluate:
  max_examples: 256
  experiment:
    arms:
      - {{name: control, weight: 0.5, version: 0}}
      - {{name: candidate, weight: 0.5, version: 3}}
    primary_metric: {{name: accuracy, direction: increase}}
    guardrails: [{{metric: loss, max_increase: 0.1}}]
    mde: 0.05
    alpha: 0.05
    horizon_rounds: {rounds}
"""


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    yield from shared_coordinator(tmp_path_factory)


def fedctl_experiment(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    parser = argparse.ArgumentParser(prog="fedctl")
    experiment_cli.register(parser.add_subparsers(dest="command", required=True),
                            _add_coordinator, _admin)
    parsed = parser.parse_args(["experiment", *args])
    capsys.readouterr()
    assert parsed.func(parsed) == 0
    return capsys.readouterr().out


def test_an_experiment_between_model_versions_decides_with_agent_processes(
    coordinator: CoordinatorProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    at = ["--coordinator", coordinator.target, "--token", ADMIN_TOKEN]
    train = write_task(tmp_path / "train.yaml", name="it-ab-train", rounds=3,
                       clients_per_round=DEVICES, min_reports=12)
    with coordinator.admin() as client:
        from core.taskspec import load_task_file

        train_id = client.create_task(load_task_file(train)).task_id
    agents = [start_agent(coordinator.target, "ab-agent", f"digits:shard=0/{DEVICES}",
                          devices=DEVICES, log=tmp_path / "agent.log")]
    try:
        with coordinator.admin() as client:
            assert wait_for_task(client, train_id).state == "completed", coordinator.log_text()

        bad = tmp_path / "bad.yaml"
        bad.write_text(EXPERIMENT.format(rounds=3, devices=DEVICES)
                       .replace("direction: increase", "direction: up"))
        with pytest.raises(CliError) as refused:
            fedctl_experiment(capsys, "launch", str(bad), "--source-task", train_id, *at)
        assert refused.value.exit_code == 2
        assert str(refused.value).startswith(
            f"{bad}: field 'evaluate.experiment.primary_metric.direction'")

        path = tmp_path / "ab.yaml"
        path.write_text(EXPERIMENT.format(rounds=3, devices=DEVICES))
        ab_id = fedctl_experiment(capsys, "launch", str(path), "--source-task", train_id,
                                  *at).strip()
        with coordinator.admin() as client:
            task = wait_for_task(client, ab_id)
            rounds = [r for r in client.list_rounds(ab_id) if r.state == "committed"]
        # The trained version (accuracy ~0.6) beats the initial one (~0.1) at once: success,
        # stored with its reason (p ~ 1e-13 with 32 devices; the arms' sizes are random, but an
        # arm of fewer than two devices, where no look is possible, has odds ~1e-8).
        assert task.state == "completed", coordinator.log_text()
        assert task.reason.startswith("experiment decision stop_success after round 1: "
                                      "candidate beats control on accuracy"), task.reason
        # Each device evaluated one version: the arms' devices add up to the reports.
        for r in rounds:
            assert r.metrics["eval.v0.devices"] + r.metrics["eval.v3.devices"] == \
                pytest.approx(r.reports)
        m = rounds[-1].metrics  # the experiment's look: cumulative over the rounds
        assert m["experiment.control.devices"] == sum(r.metrics["eval.v0.devices"]
                                                      for r in rounds)
        assert m["experiment.srm_p"] > 0.001

        out = tmp_path / "results.json"
        table = fedctl_experiment(capsys, "status", ab_id, "--out", str(out), *at)
        assert "candidate beats control on accuracy" in table
        assert "accuracy (primary)" in table and "p (fixed horizon)" in table
        results = json.loads(out.read_text())
        assert results["decision"]["action"] == "stop_success"
        assert results["state"] == "completed"
        (primary,) = [c for c in results["comparisons"] if c["metric"] == "accuracy"]
        assert primary["always_valid"]["lower"] > 0 and primary["always_valid"]["p_value"] < 0.05
        assert [a["devices"] for a in results["arms"]] == [m["experiment.control.devices"],
                                                           m["experiment.candidate.devices"]]
        as_json = json.loads(fedctl_experiment(capsys, "status", ab_id, "--json", *at))
        assert as_json == results

        # The same comparison from a training task file's simulation.experiment section
        # (what fedctl simulate runs): its arms are the file's task after 0 and 3 rounds,
        # one training run, so --arm-tasks names the task trained above; the comparison's
        # arms name that task and their versions.
        data = yaml.safe_load(train.read_text())
        data["simulation"] = {"experiment": {
            "arms": [{"name": "control", "weight": 0.5, "trained_rounds": 0},
                     {"name": "candidate", "weight": 0.5, "trained_rounds": 3}],
            "primary_metric": {"name": "accuracy", "direction": "increase"},
            "mde": 0.05, "alpha": 0.05, "horizon_rounds": 3, "salt": "it-ab-train-salt",
            "devices_per_round": DEVICES}}
        by_training = tmp_path / "ab_train.yaml"
        by_training.write_text(yaml.safe_dump(data))
        cmp_id = fedctl_experiment(capsys, "launch", str(by_training), "--arm-tasks",
                                   train_id, *at).strip().splitlines()[-1]
        with coordinator.admin() as client:
            task = wait_for_task(client, cmp_id)
        assert task.reason.startswith("experiment decision stop_success after round 1: "
                                      "candidate beats control on accuracy"), task.reason
        stored = task_spec_from_proto(task.spec).evaluate.experiment
        assert stored is not None
        assert [(a.task, a.task_version) for a in stored.arms] == [(train_id, 0),
                                                                   (train_id, 3)]
        by_arm = json.loads(fedctl_experiment(capsys, "status", cmp_id, "--json", *at))["arms"]
        assert [(a["task"], a["task_version"]) for a in by_arm] == [(train_id, 0),
                                                                    (train_id, 3)]

        # Training partitioned by arm: one training task per arm, each admitting only its
        # arm's devices (eligibility.arm), the assignment the comparison evaluates by.
        partitioned = dict(data, name="it-part", rounds=1, clients_per_round=8, min_reports=4)
        partitioned["simulation"] = {"experiment": {
            "arms": [{"name": "control", "weight": 0.5},
                     {"name": "fast", "weight": 0.5,
                      "training": {"local.learning_rate": 0.2}}],
            "primary_metric": {"name": "accuracy", "direction": "increase"},
            "mde": 0.05, "alpha": 0.05, "horizon_rounds": 1, "salt": "it-part-salt",
            "devices_per_round": DEVICES, "partition_training": True}}
        part_file = tmp_path / "part.yaml"
        part_file.write_text(yaml.safe_dump(partitioned))
        part_id = fedctl_experiment(capsys, "launch", str(part_file), "--poll-s", "0.5",
                                    *at).strip().splitlines()[-1]
        with coordinator.admin() as client:
            stored = task_spec_from_proto(wait_for_task(client, part_id).spec
                                          ).evaluate.experiment
            assert stored is not None
            for index, tid in enumerate(a.task for a in stored.arms):
                arm = task_spec_from_proto(client.get_task(tid).spec).eligibility.arm
                assert arm is not None and arm.index == index
                selected = {e.device_id for e in client.list_events(tid).events
                            if e.kind == "device_selected"}
                assert selected and {assign_arm(d, salt="it-part-salt",
                                                split=TrafficSplit([0.5, 0.5]))
                                     for d in selected} == {index}, (tid, selected)

        # A running experiment is stopped by the engineer, and says so.
        long = tmp_path / "long.yaml"
        long.write_text(EXPERIMENT.format(rounds=50, devices=DEVICES + 4))  # never fills
        long_id = fedctl_experiment(capsys, "launch", str(long), "--source-task", train_id,
                                    *at).strip()
        stopped = fedctl_experiment(capsys, "stop", long_id, "--reason", "a bug in v3", *at)
        assert f"{long_id}: cancelled: cancelled by an operator: a bug in v3" in stopped
        status = json.loads(fedctl_experiment(capsys, "status", long_id, "--json", *at))
        assert status["decision"] == {"action": "ended_cancelled",
                                      "reason": "cancelled by an operator: a bug in v3"}
    finally:
        codes = stop_all(agents)
    assert codes == [0]
