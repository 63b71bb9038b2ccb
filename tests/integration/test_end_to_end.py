"""A real task over gRPC: coordinator process, agent processes, the engineer's CLI."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
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

from core.tensors import load_safetensors

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests (each makes and looks at its own tasks and
    agents)."""
    yield from shared_coordinator(tmp_path_factory)


def fedctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_a_task_runs_to_completion_with_agent_processes(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    task_file = write_task(tmp_path / "task.yaml", rounds=2, clients_per_round=4, min_reports=3)
    launched = fedctl("task", "launch", str(task_file), "--coordinator", coordinator.target)
    assert launched.returncode == 0, launched.stderr
    task_id = launched.stdout.strip()

    agents = [
        start_agent(coordinator.target, f"agent{i}", f"digits:shard={3 * i}/6,dirichlet=0.5",
                    devices=3, task_id=task_id, log=tmp_path / f"agent{i}.log")
        for i in range(2)
    ]
    with coordinator.admin() as client:
        task = wait_for_task(client, task_id)
        rounds = client.list_rounds(task_id)
    assert task.state == "completed", coordinator.log_text()
    committed = [r for r in rounds if r.state == "committed"]
    assert [r.round_number for r in committed] == [1, 2]
    assert all(r.reports >= 3 for r in committed)
    assert all(0 <= r.metrics["server_eval_accuracy"] <= 1 for r in committed)

    out = tmp_path / "model.safetensors"
    latest = tmp_path / "latest.safetensors"
    at = ["--coordinator", coordinator.target]
    watched, status, listed, pulled, pulled_latest = fedctl_at_once(
        ["task", "watch", task_id, *at], ["task", "status", task_id, *at], ["task", "list", *at],
        ["model", "pull", task_id, "--version", "1", "-o", str(out), *at],
        ["model", "pull", task_id, "-o", str(latest), *at])
    # Meanwhile the agents' devices learn that the task ended (a device left out of the last
    # round may be waiting out a "come back later" of seconds).
    codes = [p.wait(timeout=60) for p in agents]
    assert codes == [0, 0], "agents exit by themselves when told the task is finished"
    assert watched.returncode == 0 and f"task {task_id}: completed after 2 rounds" in watched.stdout
    assert status.returncode == 0 and "completed" in status.stdout
    assert task_id in listed.stdout

    assert pulled.returncode == 0, pulled.stderr
    params = load_safetensors(out.read_bytes())
    assert all(np.isfinite(v).all() for v in params.values())
    assert pulled_latest.returncode == 0, pulled_latest.stderr
    assert hashlib.sha256(latest.read_bytes()).hexdigest() != hashlib.sha256(
        out.read_bytes()).hexdigest()


def test_cli_errors_name_the_file_and_field_and_do_not_trace(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(write_task(tmp_path / "ok.yaml").read_text().replace("rounds: 2", "rounds: -1"))
    unknown_model = tmp_path / "model.yaml"
    unknown_model.write_text(
        write_task(tmp_path / "ok2.yaml").read_text().replace("logistic_regression", "resnet9000"))
    at = ["--coordinator", coordinator.target]
    # Independent commands, each refused: all started at once.
    result, unknown, missing, down, bad_data = fedctl_at_once(
        ["task", "launch", str(bad), *at], ["task", "launch", str(unknown_model), *at],
        ["task", "status", "no-such-task", *at],
        ["task", "list", "--coordinator", "127.0.0.1:1"],
        ["agent", "run", *at, "--device-id", "x", "--data", "digits:shard=7/4"])
    assert result.returncode == 2
    assert f"{bad}: field 'rounds': must be between 1 and 1000000" in result.stderr
    assert "Traceback" not in result.stderr

    assert unknown.returncode == 1 and "INVALID_ARGUMENT" in unknown.stderr
    assert "resnet9000" in unknown.stderr and "Traceback" not in unknown.stderr

    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    assert down.returncode == 1 and "cannot reach the coordinator" in down.stderr
    assert "Traceback" not in down.stderr

    assert bad_data.returncode == 1 and "shard" in bad_data.stderr
    assert "Traceback" not in bad_data.stderr


def test_agents_exit_cleanly_on_sigterm(coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    # A population of its own: its synthetic data ([60] features) must not become what the
    # default population reported for the next tests' launch checks on this coordinator.
    agent = start_agent(coordinator.target, "idle", "synthetic:alpha=1,beta=1,shard=0/4",
                        devices=2, log=log, verbose=True, extra=["--population", "idle"])
    # Up and polling first (a SIGTERM during its imports would test Python, not the agent).
    deadline = time.monotonic() + 60
    while log.read_text(errors="replace").count("checked in with data") < 2:
        assert agent.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, "the devices did not check in"
        time.sleep(0.1)
    try:
        agent.wait(timeout=3)
        pytest.fail("an agent with no task keeps polling")
    except subprocess.TimeoutExpired:
        pass
    assert stop_all([agent]) == [0]


def test_an_agent_gives_up_on_an_absent_coordinator_with_a_message(tmp_path: Path) -> None:
    result = fedctl("agent", "run", "--coordinator", "127.0.0.1:1", "--device-id", "lonely",
                    "--data", "digits:shard=0/4", "--give-up-after", "1")
    assert result.returncode == 1
    assert "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_a_second_coordinator_on_the_same_port_or_store_is_refused_cleanly(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    with coordinator.admin() as admin:
        tasks_before = [t.task_id for t in admin.list_tasks()]
    # Two refusals that share nothing but the running coordinator: started at once.
    same_port, same_store = fedctl_at_once(
        ["coordinator", "serve", "--db", f"sqlite:///{tmp_path}/other.db",
         "--store", str(tmp_path / "other"), "--port", str(coordinator.port)],
        ["coordinator", "serve", "--db", coordinator.db_url,
         "--store", str(coordinator.workdir / "store"), "--port", "0"])
    assert same_port.returncode == 1 and "cannot listen on" in same_port.stderr
    assert same_store.returncode == 1 and "in use by another coordinator" in same_store.stderr
    for result in (same_port, same_store):
        assert "Traceback" not in result.stderr
    with coordinator.admin() as admin:
        # The running coordinator is untouched (the module's other tests may have made tasks).
        assert [t.task_id for t in admin.list_tasks()] == tasks_before


def test_a_bad_database_url_is_a_message(tmp_path: Path) -> None:
    result = fedctl("coordinator", "serve", "--db", "nosuchdb://x", "--store",
                    str(tmp_path / "s"), "--port", "0")
    assert result.returncode == 1 and "cannot open database nosuchdb://x" in result.stderr
    assert "Traceback" not in result.stderr
