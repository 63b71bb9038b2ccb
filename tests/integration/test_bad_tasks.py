"""Tasks that do not fit their devices' data, over real gRPC with real agent processes:
refused at launch when the population already said what its data looks like; declined by
the devices that cannot run them, which go on with everything else; failed with the reason
when no device can run them, instead of waiting for reports that never come."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    ENV,
    CoordinatorProcess,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from core.taskspec import load_task_file
from fedctl.admin import AdminError

pytestmark = pytest.mark.integration

#: The agents load tests/integration/uneven_data_app.py with --app.
APP_ENV = {"PYTHONPATH": os.pathsep.join(
    p for p in (str(Path(__file__).parent), ENV.get("PYTHONPATH", "")) if p)}
NARROW_MODEL = "{input_dim: 60, num_classes: 10}"


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests (a process costs seconds of start-up: torch).
    What a population's devices report is what these tests are about, so each test's task
    and devices are a population of their own."""
    yield from shared_coordinator(tmp_path_factory)


def wait_for_check_ins(log: Path, devices: int, agent: subprocess.Popen[bytes],
                       timeout_s: float = 60) -> None:
    """Until each of the agent's devices has checked in once (so the coordinator knows its
    data)."""
    deadline = time.monotonic() + timeout_s
    while log.read_text(errors="replace").count("checked in with data") < devices:
        assert agent.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, "the devices did not check in"
        time.sleep(0.1)


def test_a_task_whose_model_does_not_fit_the_populations_data_is_refused_at_launch(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    log = tmp_path / "agent.log"
    agent = start_agent(coordinator.target, "digits", "digits:shard=0/4", devices=2, log=log,
                        verbose=True, extra=["--population", "wide"])
    try:
        wait_for_check_ins(log, 2, agent)
        spec = load_task_file(write_task(tmp_path / "t.yaml", arguments=NARROW_MODEL,
                                         extra="population: wide\n"))
        with coordinator.admin() as admin, pytest.raises(AdminError) as refused:
            admin.create_task(spec)
        assert refused.value.code == "FAILED_PRECONDITION"
        assert refused.value.message.startswith(
            "task 'it': the model does not fit the data population 'wide' reported, [64] "
            "-> 10 classes (2 devices): a batch of shape [1, 64] raised RuntimeError")
        assert "takes 60 features" in refused.value.message
        assert agent.poll() is None
    finally:
        stop_all([agent])


def test_a_device_whose_data_does_not_fit_declines_and_its_agents_other_devices_finish(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    # Every device is drawn (4 of 4), so the narrow one takes part, and declines.
    spec = load_task_file(write_task(tmp_path / "t.yaml", rounds=1, clients_per_round=4,
                                     min_reports=3, round_deadline_s=120,
                                     extra="population: uneven\n"))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    log = tmp_path / "agent.log"
    agent = start_agent(coordinator.target, "uneven", "uneven:shard=0/4,narrow=0", devices=4,
                        log=log, verbose=True, env=APP_ENV,
                        extra=["--app", "uneven_data_app:app", "--population", "uneven"])
    try:
        with coordinator.admin() as admin:
            # Well before the deadline: the decline ends the round (8 s here when quiet, 30 s
            # seen with three test workers and other work on two cores).
            task = wait_for_task(admin, task_id, timeout_s=100)
        assert task.state == "completed", task.reason
        [(reason, count)] = task.declines_by_reason.items()
        assert count == 1
        assert reason.startswith("the model does not fit this device's data ([60] -> 10 "
                                 "classes): a batch of shape [1, 60] raised RuntimeError")
        assert agent.poll() is None  # the agent still serves its devices
        assert "crashed" not in log.read_text(errors="replace")
    finally:
        assert stop_all([agent]) == [0]


def test_a_task_no_device_can_run_fails_with_the_reason_instead_of_hanging(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    # Launched before any device reported its data, so nothing can be checked at launch.
    spec = load_task_file(write_task(tmp_path / "t.yaml", arguments=NARROW_MODEL, rounds=1,
                                     clients_per_round=3, min_reports=2, round_deadline_s=60,
                                     extra="population: unfit\n"))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    log = tmp_path / "agent.log"
    agent = start_agent(coordinator.target, "digits", "digits:shard=0/4", devices=3, log=log,
                        verbose=True, extra=["--population", "unfit"])
    try:
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=45)  # well before the deadline
        assert task.state == "failed"
        assert task.reason.startswith("no device could run the task: ")
        assert "the model does not fit this device's data ([64] -> 10 classes)" in task.reason
        [(reason, count)] = task.declines_by_reason.items()
        assert count >= 2 and reason.startswith("the model does not fit this device's data")
        assert agent.poll() is None  # declining is not crashing
    finally:
        stop_all([agent])
