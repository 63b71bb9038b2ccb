"""A launch builds, checks and writes the task's model off the event loop (a 100M-parameter
model takes seconds): the coordinator's other calls are answered meanwhile. A real gRPC
server on port 0, a real SQLite file; only the model's construction is slowed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import coordinator.rounds.tasks as tasks_module
from coordinator.app import EmbeddedCoordinator
from coordinator.security.roles import Role
from coordinator.settings import CoordinatorSettings
from core.types import ModelSpec, TaskSpec
from fedctl.admin import AdminClient

BUILD_S = 2.0


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[EmbeddedCoordinator]:
    c = EmbeddedCoordinator(CoordinatorSettings(
        host="127.0.0.1", port=0, db_url=f"sqlite:///{tmp_path}/c.db",
        store_dir=tmp_path / "store"))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def test_other_calls_are_answered_while_a_task_model_is_built(
        coordinator: EmbeddedCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    building = threading.Event()
    real = tasks_module.initial_params

    def slow(spec: TaskSpec) -> dict[str, np.ndarray]:
        building.set()
        time.sleep(BUILD_S)  # what building a very large model costs
        return real(spec)

    monkeypatch.setattr(tasks_module, "initial_params", slow)
    _, token = coordinator.security.admin.create_token(Role.ADMIN)
    target = f"127.0.0.1:{coordinator.port}"
    spec = TaskSpec(name="big", model=ModelSpec(
        "logistic_regression", {"input_dim": 64, "num_classes": 10}), rounds=1,
        clients_per_round=2, min_reports=1)

    def launch() -> str:
        with AdminClient(target, token=token) as admin:
            return str(admin.create_task(spec).task_id)

    with ThreadPoolExecutor(1) as pool:
        launched = pool.submit(launch)
        assert building.wait(30), "the launch never started building the model"
        with AdminClient(target, token=token) as admin:
            started = time.monotonic()
            assert admin.list_tasks() == []  # not yet registered: nothing half-made shows
            answered_in = time.monotonic() - started
        task_id = launched.result(timeout=60)
    assert answered_in < BUILD_S / 2, f"a read waited {answered_in:.2f} s for the launch"
    with AdminClient(target, token=token) as admin:
        assert [t.task_id for t in admin.list_tasks()] == [task_id]
