"""Central differential privacy over real gRPC with agent processes and secure aggregation:
devices clip before masking, the coordinator noises the unmasked sum, stores epsilon with
every round, `fedctl task status` shows it, and the task ends when the next round would
exceed its budget."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from core.privacy import Sampling, epsilon
from core.taskspec import load_task_file
from protos.fedcoord.v1 import admin_pb2

pytestmark = pytest.mark.integration

#: The module's devices: one agent process hosts all eight (each process costs seconds of
#: start-up: torch) and serves every test's task in turn.
DEVICES = 8
#: Every device checks in each round and 5 of the 8 are drawn: q = 5 / 8.
POPULATION, COHORT, Z = DEVICES, 5, 1.0


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests: each runs its own task, one after the other,
    on the module's devices."""
    yield from shared_coordinator(tmp_path_factory)


@pytest.fixture(scope="module")
def agent_log(coordinator: CoordinatorProcess,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The log of one agent process hosting the module's eight devices, each of which has
    checked in once before any test launches its task: however slowly the process starts on
    a loaded machine, the devices then come back at most ~6 s apart (told so while no task
    runs), and every one checks in within each task's first selection window. The devices
    serve whatever task their population runs, so the tests take turns (each waits for its
    task to end); the log is verbose (the local DP test reads the devices' epsilons from
    it, and this fixture their first check-ins)."""
    log = tmp_path_factory.mktemp("agents") / "agent.log"
    agent = start_agent(coordinator.target, "dp-", f"digits:shard=0/{DEVICES},dirichlet=0.5",
                        devices=DEVICES, log=log, verbose=True)
    try:
        deadline = time.monotonic() + 180
        while log.read_text(errors="replace").count("checked in with data") < DEVICES:
            assert agent.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the agent's devices never all checked in"
            time.sleep(0.2)
        yield log
    finally:
        stop_all([agent])


def eps(rounds: int) -> float:
    return epsilon(noise_multiplier=Z, sampling_rate=COHORT / POPULATION, steps=rounds,
                   delta=1e-5, sampling=Sampling.FIXED_SIZE, population=POPULATION)


def fedctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def run_task(coordinator: CoordinatorProcess, tmp_path: Path, name: str, extra: str,
             rounds: int, cohort: int = COHORT, window_s: float = 7.0
             ) -> tuple[str, admin_pb2.Task, list[admin_pb2.Round]]:
    """Launches a task (in this process: the CLI's launch is tested elsewhere, and a fedctl
    process costs a second or two of imports) and waits until it ends (the module's devices
    run it)."""
    task_file = write_task(tmp_path / f"{name}.yaml", name=name, rounds=rounds,
                           clients_per_round=cohort, over_selection=1.0,
                           min_reports=min(cohort, 3), extra=extra,
                           # Central DP: long enough for every device (told to come back
                           # within ~6 s) to check in, as q is computed from what a window
                           # sees. Local DP's devices account for themselves.
                           selection_window_s=window_s)
    with coordinator.admin() as client:
        task_id = client.create_task(load_task_file(task_file)).task_id
        task = wait_for_task(client, task_id, until=("completed", "failed", "cancelled",
                                                      "budget_exhausted"))
        rounds_seen = list(client.list_rounds(task_id))
    return task_id, task, rounds_seen


def test_a_dp_task_with_secure_aggregation_stops_at_its_budget(
    coordinator: CoordinatorProcess, agent_log: Path, tmp_path: Path
) -> None:
    budget = (eps(2) + eps(3)) / 2  # two rounds fit, a third would not
    extra = (
        "secure_aggregation: {protocol: secagg, threshold: 0.6, dropout: 0.001, clip: 0.5, "
        "phase_timeout_s: 20}\n"
        f"privacy: {{mode: central, noise_multiplier: {Z}, delta: 1.0e-5, clip: 0.5, "
        f"population: {POPULATION}, sampling: fixed, max_epsilon: {budget}}}\n")
    task_id, task, rounds = run_task(coordinator, tmp_path, "dp", extra, rounds=5)
    assert task.state == "budget_exhausted", coordinator.log_text()
    committed = [r for r in rounds if r.state == "committed"]
    assert len(committed) == 2 and task.rounds_committed == 2
    spent = [r.metrics["dp_epsilon"] for r in committed]
    assert spent == pytest.approx([eps(1), eps(2)])
    # Every drawn device's report is summed; no example count or device metric is released.
    assert all(r.metrics["reports"] == COHORT and r.metrics["dp_cohort"] == COHORT
               and r.metrics["dp_eligible"] == DEVICES for r in committed)
    assert not any({"examples", "train_loss", "eval_loss"} & set(r.metrics) for r in committed)
    assert task.privacy.epsilon == pytest.approx(spent[-1]) and task.privacy.budget == budget
    assert task.metrics_release == "withheld"
    status = fedctl("task", "status", task_id, "--coordinator", coordinator.target)
    assert status.returncode == 0, status.stderr
    assert "epsilon" in status.stdout and f"{spent[-1]:.3f}" in status.stdout
    watched = fedctl("task", "watch", task_id, "--coordinator", coordinator.target)
    assert watched.returncode == 0, "stopping at the budget is how a DP task ends"
    assert f"task {task_id}: budget_exhausted after 2 rounds" in watched.stdout


def test_distributed_dp_noise_is_added_by_the_agents_and_accounted_as_received(
    coordinator: CoordinatorProcess, agent_log: Path, tmp_path: Path
) -> None:
    extra = (
        "secure_aggregation: {protocol: secagg, threshold: 0.6, dropout: 0.001, "
        "phase_timeout_s: 20}\n"
        f"privacy: {{mode: distributed, noise_multiplier: {Z}, delta: 1.0e-5, clip: 0.5, "
        f"population: {POPULATION}, sampling: fixed, min_noise_multiplier: 0.5, "
        "max_epsilon: 100.0}\n")
    _, task, rounds = run_task(coordinator, tmp_path, "ddp", extra, rounds=1)
    assert task.state == "completed", coordinator.log_text()
    committed = [r for r in rounds if r.state == "committed"]
    assert len(committed) == 1
    m = committed[0].metrics
    # Every device reported: the shares add up to the planned multiplier.
    assert m["dp_noise_multiplier"] == pytest.approx(Z)
    assert m["dp_epsilon"] == pytest.approx(eps(1))
    assert 0 <= m["server_eval_accuracy"] <= 1


def test_local_dp_agents_train_with_dp_sgd_and_report_their_epsilon(
    coordinator: CoordinatorProcess, agent_log: Path, tmp_path: Path
) -> None:
    extra = "privacy: {mode: local, local: {noise_multiplier: 1.0, max_grad_norm: 1.0, " \
            "delta: 1.0e-5, max_epsilon: 100.0}}\n"
    task_id, task, rounds = run_task(coordinator, tmp_path, "ldp", extra, rounds=2,
                                     cohort=DEVICES, window_s=1.0)
    assert task.state == "completed", coordinator.log_text()
    committed = [r for r in rounds if r.state == "committed"]
    assert len(committed) == 2
    # Device metrics (their losses, and their epsilons, which depend on their data size)
    # are withheld under DP; each agent logs its own device's epsilon.
    assert not any(k.startswith(("local_dp", "train_", "eval_")) or k == "examples"
                   for r in committed for k in r.metrics)
    assert task.metrics_release == "withheld"
    # Only this module's local DP task has devices logging a local DP epsilon.
    assert "local DP epsilon" in agent_log.read_text(errors="replace")
    watched = fedctl("task", "watch", task_id, "--coordinator", coordinator.target)
    assert watched.returncode == 0 and "completed after 2 rounds" in watched.stdout
