"""Secure aggregation over real gRPC with agent processes: the coordinator only ever sees
masked vectors, yet reaches the model plaintext FedAvg reaches; agents killed in the middle of
the protocol do not stop the round."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from harness import (
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from core.tensors import load_safetensors
from device_agent.runtime.faults import FAULT_ENV

pytestmark = pytest.mark.integration

SECURE = ("secure_aggregation: {protocol: secagg, threshold: 0.6, dropout: 0.001, clip: 0.5, "
          "phase_timeout_s: 8}\n")
PROCESSES, PER_PROCESS = 4, 2
DEVICES = PROCESSES * PER_PROCESS


def fedctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def run_task(coordinator: CoordinatorProcess, tmp_path: Path, name: str, extra: str,
             *, crash_at: str | None = None, rounds: int = 2, deadline: int = 60,
             ) -> tuple[str, list[object]]:
    task_file = write_task(tmp_path / f"{name}.yaml", name=name, rounds=rounds,
                           clients_per_round=DEVICES, min_reports=5,
                           round_deadline_s=deadline, extra=extra)
    launched = fedctl("task", "launch", str(task_file), "--coordinator", coordinator.target)
    assert launched.returncode == 0, launched.stderr
    task_id = launched.stdout.strip()
    logs = [tmp_path / f"{name}-agent{i}.log" for i in range(PROCESSES)]
    agents = [
        start_agent(coordinator.target, f"a{i}-",  # same ids: same local shuffles
                    f"digits:shard={PER_PROCESS * i}/{DEVICES},dirichlet=0.5",
                    devices=PER_PROCESS, task_id=task_id, log=logs[i], verbose=True,
                    # The first process SIGKILLs itself when a device reaches crash_at.
                    env={FAULT_ENV: crash_at} if crash_at and i == 0 else None)
        for i in range(PROCESSES)
    ]
    try:
        with coordinator.admin() as client:
            task = wait_for_task(client, task_id)
            rounds_seen = list(client.list_rounds(task_id))
        assert task.state == "completed", coordinator.log_text()
    finally:
        stop_all(agents)
    return task_id, rounds_seen


def pull(coordinator: CoordinatorProcess, task_id: str, out: Path) -> dict[str, np.ndarray]:
    pulled = fedctl("model", "pull", task_id, "-o", str(out), "--coordinator",
                    coordinator.target)
    assert pulled.returncode == 0, pulled.stderr
    return load_safetensors(out.read_bytes())


def test_secure_aggregation_reaches_the_plaintext_model(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    plain_id, _ = run_task(coordinator, tmp_path, "plain", "")
    secure_id, rounds = run_task(coordinator, tmp_path, "secure", SECURE)
    committed = [r for r in rounds if r.state == "committed"]  # type: ignore[attr-defined]
    assert len(committed) == 2
    assert all(r.metrics["reports"] == DEVICES for r in committed)  # type: ignore[attr-defined]
    plain = pull(coordinator, plain_id, tmp_path / "plain.safetensors")
    secure = pull(coordinator, secure_id, tmp_path / "secure.safetensors")
    for name, value in plain.items():
        np.testing.assert_allclose(secure[name], value, atol=1e-4)


def test_agents_killed_mid_protocol_do_not_stop_the_round(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    _, rounds = run_task(coordinator, tmp_path, "killed", SECURE,
                         crash_at="secagg.masked_input@1", rounds=2, deadline=15)
    committed = [r for r in rounds if r.state == "committed"]  # type: ignore[attr-defined]
    first = committed[0]
    assert first.round_number == 1  # type: ignore[attr-defined]
    m = first.metrics  # type: ignore[attr-defined]
    lost = DEVICES - m["reports"]
    assert 1 <= lost <= PER_PROCESS, "the killed process's devices dropped out"
    assert m["secagg_dropped"] >= 1, "a device died after sharing its keys: its masks removed"
    assert m["secagg_threshold"] <= m["reports"]
    assert 0 <= committed[-1].metrics["server_eval_accuracy"] <= 1  # type: ignore[attr-defined]
