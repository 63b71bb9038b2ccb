"""An evaluation task end to end over gRPC: a coordinator process, agent processes and the
engineer's CLI. A training task commits a version; an evaluation task launched from a task
file with ``--source-task`` compares it with the initial model on the devices' own data
(under secure aggregation: only the sums of the reports are ever unmasked); ``fedctl task
status`` shows the results."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    fedctl_at_once,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

pytestmark = pytest.mark.integration

EVALUATE = """\
name: it-eval
kind: evaluate
population: it-eval
model:
  architecture: logistic_regression
  arguments: {{input_dim: 64, num_classes: 10}}
rounds: 1
clients_per_round: 4
min_reports: 3
over_selection: 1.0
round_deadline_s: 60
selection_window_s: 1.0
evaluate:
  versions: [0, 1]
  max_examples: 256
  histograms: {{loss: {{bins: 16, low: 0, high: 4}}, accuracy: {{bins: 10}}}}
  quantiles: [0.1, 0.5, 0.9]
  sketch: {sketch}
{extra}"""
SECURE = ("secure_aggregation: {protocol: secagg, threshold: 0.6, dropout: 0.001, clip: 0.5, "
          "phase_timeout_s: 20}\n")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    yield from shared_coordinator(tmp_path_factory)


def fedctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_an_evaluation_task_compares_model_versions_with_agent_processes(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    at = ["--coordinator", coordinator.target]
    # A population of this module's own: the coordinator is shared with other modules,
    # whose devices would otherwise train and evaluate here too, on data of their own.
    train = write_task(tmp_path / "train.yaml", name="it-train", rounds=1,
                       clients_per_round=4, min_reports=3, extra="population: it-eval\n")
    launched = fedctl("task", "launch", str(train), *at)
    assert launched.returncode == 0, launched.stderr
    train_id = launched.stdout.strip()
    # The agent's six devices serve whatever task runs: the training task, then the
    # evaluations (one process: each costs seconds of start-up, torch).
    agents = [start_agent(coordinator.target, "eval-agent", "digits:shard=0/6,dirichlet=0.5",
                          devices=6, log=tmp_path / "agent.log",
                          extra=["--population", "it-eval"])]
    try:
        with coordinator.admin() as client:
            assert wait_for_task(client, train_id).state == "completed", coordinator.log_text()

        plain = tmp_path / "evaluate.yaml"
        # The plain task asks for per-example sketches (opt-in: clear reports only).
        plain.write_text(EVALUATE.format(extra="", sketch="true"))
        secure = tmp_path / "evaluate_secure.yaml"
        # Every one of the six devices: SecAgg+'s parameters need more than four.
        secure.write_text(EVALUATE.format(extra=SECURE, sketch="false")
                          .replace("name: it-eval", "name: it-eval-secure")
                          .replace("clients_per_round: 4", "clients_per_round: 6")
                          .replace("min_reports: 3", "min_reports: 4"))
        bad = tmp_path / "bad.yaml"
        bad.write_text(EVALUATE.format(extra="", sketch="false").replace("bins: 10", "bins: 0"))
        ok, refused, missing = fedctl_at_once(
            ["task", "launch", str(plain), "--source-task", train_id, "--json", *at],
            ["task", "launch", str(bad), "--source-task", train_id, *at],
            ["task", "launch", str(plain), "--source-task", "no-such-task", *at])
        assert ok.returncode == 0, ok.stderr
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert f"{bad}: field 'evaluate.histograms.accuracy.bins'" in refused.stderr
        assert missing.returncode == 1 and "INVALID_ARGUMENT" in missing.stderr
        assert "spec.evaluate.source_task: no task with id" in missing.stderr
        eval_id = json.loads(ok.stdout)["task_id"]

        with coordinator.admin() as client:
            task = wait_for_task(client, eval_id)
            assert task.state == "completed", coordinator.log_text()
            (rnd,) = [r for r in client.list_rounds(eval_id) if r.state == "committed"]
        m = rnd.metrics
        for v in (0, 1):
            assert m[f"eval.v{v}.devices"] >= 3
            assert m[f"eval.v{v}.examples"] > 0
            assert 0 <= m[f"eval.v{v}.accuracy.mean"] <= 1
            assert m[f"eval.v{v}.accuracy.se"] > 0
            assert m[f"eval.v{v}.loss.q10"] <= m[f"eval.v{v}.loss.q50"] <= m[f"eval.v{v}.loss.q90"]
            # Per-example quantiles from the devices' merged KLL sketches (clear reports).
            assert (m[f"eval.v{v}.loss.example_q10"] <= m[f"eval.v{v}.loss.example_q50"]
                    <= m[f"eval.v{v}.loss.example_q90"])
            assert 0 <= m[f"eval.v{v}.loss.example_rank_error"] < 0.05
        # The trained version beats the initial one on the devices' own test data (one round
        # of 3-4 non-IID devices, evaluated by 3-4 of them: gains of 0.12-0.16 were seen).
        assert m["eval.v1.accuracy.mean"] > m["eval.v0.accuracy.mean"] + 0.1
        assert m["eval.v1.loss.mean"] < m["eval.v0.loss.mean"]

        launched = fedctl("task", "launch", str(secure), "--source-task", train_id, *at)
        assert launched.returncode == 0, launched.stderr
        secure_id = launched.stdout.strip()
        with coordinator.admin() as client:
            task = wait_for_task(client, secure_id)
            assert task.state == "completed", coordinator.log_text()
            (srnd,) = [r for r in client.list_rounds(secure_id) if r.state == "committed"]
        s = srnd.metrics
        assert s["eval.v1.accuracy.mean_bound"] < 0.01
        assert s["eval.v0.devices"] == pytest.approx(srnd.reports, abs=0.01)
        assert not any(".example_" in k for k in s)  # a sketch cannot be masked-summed

        status, status_json = fedctl_at_once(["task", "status", eval_id, *at],
                                             ["task", "status", eval_id, "--json", *at])
        assert status.returncode == 0, status.stderr
        assert "evaluation results" in status.stdout and "accuracy" in status.stdout
        assert "quantiles of examples" in status.stdout
        assert "eval.v0" not in status.stdout  # the results are a table, not metric columns
        results = json.loads(status_json.stdout)["evaluation"]
        assert results["1"]["1"]["accuracy"]["mean"] == pytest.approx(
            m["eval.v1.accuracy.mean"])
    finally:
        codes = stop_all(agents)
    assert codes == [0]
