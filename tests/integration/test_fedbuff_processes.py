"""Asynchronous FedBuff over gRPC: a real coordinator process and agent processes of
different speeds (tests/integration/slow_agents_app.py), with today's agent unchanged."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest
from harness import CoordinatorProcess, start_agent, stop_all, wait_for_task, write_task
from slow_agents_app import STEP_ENV

from core.privacy import epsilon
from core.taskspec import load_task_file

pytestmark = pytest.mark.integration

APP = ["--app", "slow_agents_app:app"]
ASYNC = ("aggregation: {mode: async, buffer: 3, max_concurrency: 6, max_staleness: 4,\n"
         "              staleness: {kind: polynomial, exponent: 0.5}}\n")


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """A coordinator that loads the test app (it builds and evaluates the model), one for the
    module's tests: each makes its own task and agents, and looks only at those."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent),
                                       harness.ENV.get("PYTHONPATH", "")) if p)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(harness.ENV, "PYTHONPATH", path)
        c = CoordinatorProcess(tmp_path_factory.mktemp("coordinator"))
        c.start(APP)
        try:
            yield c
        finally:
            c.stop()


def test_an_async_task_with_fast_and_slow_agents_completes_and_learns(
        coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    spec = load_task_file(write_task(
        tmp_path / "task.yaml", architecture="sleepy_logistic_regression", rounds=8,
        clients_per_round=3, min_reports=1, round_deadline_s=30, extra=ASYNC))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    # Six fast devices in one process, three slow ones in another (seconds of sleep per
    # step; a process costs seconds of start-up: torch).
    layout = {"fast": (0, 6, 0.0), "slow": (6, 3, 0.03)}  # first shard, devices, step
    agents = [
        start_agent(coordinator.target, name, f"digits:shard={first}/9,dirichlet=0.5",
                    devices=devices, task_id=task_id, extra=APP, log=tmp_path / f"{name}.log",
                    env={STEP_ENV: str(step)})
        for name, (first, devices, step) in layout.items()
    ]
    try:
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=60)
            rounds = admin.list_rounds(task_id)
        codes = [p.wait(timeout=30) for p in agents]
    finally:
        stop_all(agents)
    assert task.state == "completed", coordinator.log_text()
    committed = [r for r in rounds if r.state == "committed"]
    assert [r.round_number for r in committed] == list(range(1, 9))
    assert all(r.reports == 3 for r in committed)
    accuracy = [r.metrics["server_eval_accuracy"] for r in committed]
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
    assert codes == [0, 0], "agents exit by themselves when told the task is finished"


def test_an_async_task_with_central_dp_releases_noised_versions_and_accounts_each(
        coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    """Agents clip to the plan's C and withhold their metrics; each version is one noised
    release, accounted as a release over the whole population (q = 1)."""
    privacy = ("privacy: {mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0,\n"
               "          population: 4, sampling: fixed, max_epsilon: 1000.0}\n")
    spec = load_task_file(write_task(
        tmp_path / "task.yaml", architecture="sleepy_logistic_regression", rounds=3,
        clients_per_round=2, min_reports=1, round_deadline_s=30,
        extra=ASYNC.replace("buffer: 3", "buffer: 2") + privacy))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    agents = [start_agent(coordinator.target, "agent", "digits:shard=0/4,dirichlet=0.5",
                          devices=4, task_id=task_id, extra=APP, log=tmp_path / "agent.log",
                          env={STEP_ENV: "0.0"})]
    try:
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=60)
            rounds = admin.list_rounds(task_id)
    finally:
        stop_all(agents)
    assert task.state == "completed", coordinator.log_text()
    committed = [r for r in rounds if r.state == "committed"]
    assert len(committed) == 3
    expected = [epsilon(noise_multiplier=0.5, sampling_rate=1.0, steps=v, delta=1e-5)
                for v in (1, 2, 3)]
    assert [r.metrics["dp_epsilon"] for r in committed] == pytest.approx(expected)
    assert all(r.metrics["dp_sampling_rate"] == 1.0 for r in committed)
    assert not any({"examples", "train_loss", "eval_loss"} & set(r.metrics) for r in committed)
    assert task.privacy.epsilon == pytest.approx(expected[-1])
