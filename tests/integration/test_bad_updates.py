"""Every rejection over real gRPC: a clear status, and the round still aggregates finitely."""

from __future__ import annotations

import hashlib
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import (
    CoordinatorProcess,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)
from rogue import RogueDevice, status_of

from core.taskspec import load_task_file
from core.tensors import load_safetensors
from protos.fedcoord.v1 import common_pb2, device_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests that take it (each makes and looks at its own
    tasks and devices)."""
    yield from shared_coordinator(tmp_path_factory)


def test_malformed_late_duplicate_and_unselected_updates_are_rejected(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    spec = load_task_file(write_task(
        tmp_path / "t.yaml", rounds=1, clients_per_round=4, min_reports=3,
        over_selection=1.25, selection_window_s=4.0))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    rogue_a = RogueDevice(coordinator.target, "rogue-a")
    rogue_b = RogueDevice(coordinator.target, "rogue-b")
    agent = start_agent(coordinator.target, "honest", "digits:shard=0/3,dirichlet=0.5",
                        devices=3, task_id=task_id, log=tmp_path / "agent.log")
    try:
        plan = rogue_a.join(task_id)
        rogue_b.join(task_id)
        zero = rogue_a.zero_update()
        size = len(zero)

        # NaN / inf values: rejected whole, and that device is out of the round.
        nan = bytearray(zero)
        nan[0:4] = struct.pack("<f", math.nan)
        code, msg = status_of(lambda: rogue_b.upload(bytes(nan)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in msg

        wrong_shape = [common_pb2.TensorSpec(name=t.name, dtype=t.dtype,
                                             shape=[*t.shape, 1][::-1])
                       for t in plan.update_tensors]
        code, msg = status_of(lambda: rogue_a.upload(zero, tensors=wrong_shape))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not match the model" in msg

        as_f64 = [common_pb2.TensorSpec(name=t.name, dtype=common_pb2.DTYPE_FLOAT64,
                                        shape=t.shape) for t in plan.update_tensors]
        code, msg = status_of(lambda: rogue_a.upload(zero, tensors=as_f64))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "float64" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero, total_bytes=size - 4))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "declares" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero + bytes(4), total_bytes=size,
                                                     sha256="0" * 64))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "declared" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero, total_bytes=10**12))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero, sha256="0" * 64))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero, num_examples=0))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "num_examples" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero, metrics={"loss": math.inf}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not finite" in msg

        code, msg = status_of(lambda: rogue_a.upload(zero, api_version=0))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "API v0" in msg

        stranger = device_pb2.Participation(device_id="stranger", task_id=task_id,
                                            round_number=plan.round_number, token="guess")
        code, msg = status_of(lambda: rogue_a.upload(zero, participation=stranger))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not enrolled" in msg
        outsider = RogueDevice(coordinator.target, "outsider")  # enrolled, never selected
        guessed = device_pb2.Participation(device_id=outsider.device_id, task_id=task_id,
                                           round_number=plan.round_number, token="guess")
        code, msg = status_of(lambda: rogue_a.upload(zero, participation=guessed))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not selected" in msg
        outsider.close()

        forged = device_pb2.Participation(device_id=rogue_a.device_id, task_id=task_id,
                                          round_number=plan.round_number, token="forged")
        code, msg = status_of(lambda: rogue_a.upload(zero, participation=forged))
        assert code == grpc.StatusCode.PERMISSION_DENIED

        # A valid update is accepted once, then a second one is a duplicate.
        assert rogue_a.upload(zero).accepted
        code, msg = status_of(lambda: rogue_a.upload(zero))
        assert code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)

        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=120)
            rounds = admin.list_rounds(task_id)
            out = tmp_path / "m.safetensors"
            admin.pull_model(task_id, 0, out)
        assert task.state == "completed", coordinator.log_text()
        committed = [r for r in rounds if r.state == "committed"]
        assert len(committed) == 1 and committed[0].reports == 4
        params = load_safetensors(out.read_bytes())
        assert all(np.isfinite(v).all() for v in params.values())

        # After the round: late.
        code, msg = status_of(lambda: rogue_b.upload(zero))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop_all([agent])
        rogue_a.close()
        rogue_b.close()


def test_an_old_agent_gets_failed_precondition_not_a_parse_error(
    coordinator: CoordinatorProcess,
) -> None:
    rogue = RogueDevice(coordinator.target, "old")
    try:
        code, msg = status_of(lambda: rogue.stub.CheckIn(
            device_pb2.CheckInRequest(api_version=0, device_id="old"), timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "API v0" in msg and "upgrade" in msg
        code, msg = status_of(lambda: rogue.stub.CheckIn(
            device_pb2.CheckInRequest(api_version=1, device_id="bad id with spaces"),
            timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "DeviceProof" in msg
    finally:
        rogue.close()


def test_a_stalled_upload_is_cut_off_and_the_device_can_retry(tmp_path: Path) -> None:
    coordinator = CoordinatorProcess(tmp_path)
    coordinator.start(["--upload-idle-timeout", "1"])
    rogue = RogueDevice(coordinator.target, "staller")
    try:
        spec = load_task_file(write_task(tmp_path / "t.yaml", rounds=1, clients_per_round=1,
                                         min_reports=1, selection_window_s=0.2))
        with coordinator.admin() as admin:
            task_id = admin.create_task(spec).task_id
        rogue.join(task_id)
        zero = rogue.zero_update()
        header = device_pb2.UpdateHeader(
            api_version=1, participation=rogue.participation, num_examples=1,
            tensors=list(rogue.plan.update_tensors), total_bytes=len(zero),
            sha256=hashlib.sha256(zero).hexdigest())

        def stalling() -> Iterator[device_pb2.UploadUpdateRequest]:
            yield device_pb2.UploadUpdateRequest(header=header)
            yield device_pb2.UploadUpdateRequest(chunk=zero[:16])
            time.sleep(4)

        started = time.monotonic()
        code, msg = status_of(lambda: rogue.stub.UploadUpdate(stalling(), timeout=30))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no upload data" in msg
        assert time.monotonic() - started < 4.5
        assert rogue.upload(zero).accepted
    finally:
        rogue.close()
        coordinator.stop()
