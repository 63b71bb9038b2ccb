"""Large updates stream through in chunks; oversized ones are refused early, with the
coordinator's memory growing by no more than a few chunks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from harness import CoordinatorProcess, shared_coordinator, wait_for_task, write_task
from rogue import RogueDevice, status_of

from core.taskspec import load_task_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHUNK = 1 << 20


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests (each makes and looks at its own task and
    device; memory growth is measured from a baseline taken in the test)."""
    yield from shared_coordinator(tmp_path_factory)


def rss(coordinator: CoordinatorProcess) -> int:
    assert coordinator.proc is not None
    return int(psutil.Process(coordinator.proc.pid).memory_info().rss)


def test_a_100_mb_update_goes_through_in_chunks(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    # An MLP of 25.3M float32 parameters: a 101 MB update.
    spec = load_task_file(write_task(
        tmp_path / "big.yaml", architecture="mlp",
        arguments="{input_dim: 64, hidden: [4096, 6100], num_classes: 10}",
        rounds=1, clients_per_round=1, min_reports=1, selection_window_s=0.2))
    spec = type(spec)(**{**spec.__dict__, "evaluation": type(spec.evaluation)()})
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    device = RogueDevice(coordinator.target, "big")
    try:
        device.join(task_id)
        update = device.zero_update()
        assert len(update) > 100_000_000
        response = device.upload(update, chunk_bytes=CHUNK)
        assert response.accepted
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=120)
        assert task.state == "completed" and task.model_version == 1
    finally:
        device.close()


def test_oversized_and_mismatched_uploads_are_refused_without_buffering(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    spec = load_task_file(write_task(tmp_path / "small.yaml", rounds=1, clients_per_round=1,
                                     min_reports=1, selection_window_s=0.2))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    device = RogueDevice(coordinator.target, "flood")
    try:
        device.join(task_id)
        update = device.zero_update()
        baseline = rss(coordinator)

        # Declared size right, then 200 MB more than declared: cut off at the first excess chunk.
        code, msg = status_of(lambda: device.upload(update, extra_bytes=200 * CHUNK))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "declared" in msg

        # Declared size over the task's limit: refused from the header alone.
        code, msg = status_of(lambda: device.upload(update, total_bytes=50 << 30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg

        # One message larger than the transport's chunk limit is refused by gRPC itself.
        code, _ = status_of(lambda: device.upload(update + bytes(8 * CHUNK),
                                                  chunk_bytes=8 * CHUNK))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

        growth = rss(coordinator) - baseline
        assert growth < 4 * CHUNK + (8 << 20), f"coordinator grew by {growth / 2**20:.1f} MiB"

        assert device.upload(update).accepted  # the device can still take part normally
    finally:
        device.close()
