"""What outside testing tried against `fedctl coordinator serve` (issue 13), over real gRPC:
one seated device owning or breaking the model, memory amplification with huge or malformed
requests, and uploads counted although the client saw them fail."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from harness import (
    ADMIN_TOKEN,
    CoordinatorProcess,
    shared_coordinator,
    wait_for_task,
    write_task,
)
from rogue import RogueDevice, status_of

from core.taskspec import load_task_file
from core.tensors import load_safetensors
from core.types import API_VERSION
from protos.fedcoord.v1 import admin_pb2, common_pb2, device_pb2

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests (each makes and looks at its own tasks and devices)."""
    yield from shared_coordinator(tmp_path_factory)


def update(rogue: RogueDevice, value: float) -> bytes:
    return np.full(len(rogue.zero_update()) // 4, value, dtype="<f4").tobytes()


def latest_model(coordinator: CoordinatorProcess, task_id: str, tmp: Path
                 ) -> dict[str, np.ndarray]:
    out = tmp / "model.safetensors"
    with coordinator.admin() as admin:
        admin.pull_model(task_id, 0, out)  # 0: the latest version
    return load_safetensors(out.read_bytes())


def test_one_device_can_neither_own_nor_break_the_model(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    spec = load_task_file(write_task(
        tmp_path / "t.yaml", rounds=1, clients_per_round=4, min_reports=3,
        selection_window_s=2.0, extra="robustness: {weight_cap: 100}\n"))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    before = latest_model(coordinator, task_id, tmp_path)
    rogues = {name: RogueDevice(coordinator.target, name) for name in "abcd"}
    try:
        for r in rogues.values():
            r.join(task_id)
        # Values near float32's largest: refused by the norm bound, naming it.
        code, msg = status_of(lambda: rogues["d"].upload(update(rogues["d"], 3e38),
                                                         num_examples=2**31 - 1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "robustness.max_update_l2_norm" in msg and "1000" in msg
        # 2^31 - 1 examples weigh as the cap (100), like the honest devices' 100.
        assert rogues["a"].upload(update(rogues["a"], 1.0), num_examples=100,
                                  metrics={"train_loss": 1.0}).accepted
        assert rogues["b"].upload(update(rogues["b"], 1.0), num_examples=100,
                                  metrics={"train_loss": 1.0}).accepted
        assert rogues["c"].upload(update(rogues["c"], 4.0), num_examples=2**31 - 1, metrics={
            "train_loss": 1e9, "eval_loss": 1e9, "eval_examples": 1e9}).accepted
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=60)
            rounds = admin.list_rounds(task_id)
        assert task.state == "completed", coordinator.log_text()
        after = latest_model(coordinator, task_id, tmp_path)
        for name in before:  # the mean is (100 x 1 + 100 x 1 + 100 x 4) / 300, not ~4
            np.testing.assert_allclose(after[name], before[name] + 2.0, rtol=1e-5, atol=1e-5)
        metrics = rounds[-1].metrics
        assert metrics["examples"] == 300 and metrics["reports"] == 3
        assert all(math.isfinite(v) for v in metrics.values())
    finally:
        for r in rogues.values():
            r.close()


def test_a_model_the_server_step_makes_absurd_is_never_committed(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    spec = load_task_file(write_task(
        tmp_path / "t.yaml", rounds=1, clients_per_round=1, min_reports=1,
        selection_window_s=0.2, extra="robustness: {max_abs_parameter: 50.0}\n"))
    spec = type(spec)(**{**spec.__dict__,
                         "server": type(spec.server)(learning_rate=1000.0)})
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    rogue = RogueDevice(coordinator.target, "pusher")
    try:
        rogue.join(task_id)
        assert rogue.upload(update(rogue, 1.0)).accepted
        deadline = time.monotonic() + 30
        with coordinator.admin() as admin:
            while not [r for r in admin.list_rounds(task_id) if r.state == "failed"]:
                assert time.monotonic() < deadline, coordinator.log_text()
                time.sleep(0.1)
            failed = [r for r in admin.list_rounds(task_id) if r.state == "failed"][0]
            assert "not committed" in failed.failure_reason
            assert "robustness.max_abs_parameter (50)" in failed.failure_reason
            assert admin.get_task(task_id).model_version == 0
            admin.cancel_task(task_id)
    finally:
        rogue.close()


def rss(coordinator: CoordinatorProcess) -> int:
    assert coordinator.proc is not None
    return int(psutil.Process(coordinator.proc.pid).memory_info().rss)


def raw_call(channel: grpc.Channel, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """An authenticated call (the admin token): what is refused is the payload."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return status_of(lambda: call(data, timeout=30,
                                  metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),)))


def test_huge_and_malformed_requests_are_refused_before_they_are_parsed(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    channel = grpc.insecure_channel(coordinator.target,
                                    options=[("grpc.max_send_message_length", 256 * MIB)])
    try:
        # Eight concurrent check-ins with a 60 MB device id: refused from their size alone.
        huge = device_pb2.CheckInRequest(api_version=API_VERSION, device_id="x" * (60 * MIB))
        data = huge.SerializeToString()
        baseline = rss(coordinator)
        peak = baseline
        results: list[tuple[grpc.StatusCode, str]] = []
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss(coordinator))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        calls = [threading.Thread(target=lambda: results.append(
            raw_call(channel, "/fedcoord.v1.DeviceService/CheckIn", data))) for _ in range(8)]
        for t in calls:
            t.start()
        for t in calls:
            t.join()
        done.set()
        sampler.join()
        assert len(results) == 8
        for code, msg in results:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
            assert "limit of 65536 bytes" in msg and len(msg) < 200
        growth = peak - baseline
        # Each message is received whole by gRPC (its own limit is 64 MiB), then dropped
        # unparsed: no parsed copy, no 60 MB string, no error echoing it.
        assert growth < 8 * 2 * 60 * MIB, f"coordinator grew by {growth / MIB:.0f} MiB"

        # Not protobuf, and a string field that is not UTF-8: INVALID_ARGUMENT, not UNKNOWN.
        for garbage in (b"\xff\xff\xff\xff", b"\x12\x02\xff\xfe"):
            code, msg = raw_call(channel, "/fedcoord.v1.DeviceService/CheckIn", garbage)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid CheckInRequest" in msg
        code, msg = raw_call(channel, "/fedcoord.v1.AdminService/GetTask", b"\x0a\x05ab")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "GetTaskRequest" in msg

        # The admin's task spec may be larger than a unary call, not unbounded.
        spec = admin_pb2.CreateTaskRequest(api_version=API_VERSION, spec=common_pb2.TaskSpec(
            name="n" * (2 * MIB)))
        code, msg = raw_call(channel, "/fedcoord.v1.AdminService/CreateTask",
                             spec.SerializeToString())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"limit of {MIB} bytes" in msg

        # A masked input sized by the largest plan: no secure task runs, so 1 MiB is too large.
        masked = device_pb2.SecAggMaskedInputRequest(api_version=API_VERSION,
                                                     masked_input=bytes(MIB))
        code, msg = raw_call(channel, "/fedcoord.v1.DeviceService/SecAggMaskedInput",
                             masked.SerializeToString())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "SecAggMaskedInput" in msg

        # Errors never echo unbounded input: a 50 KB task id is shown cut short.
        enrolled = RogueDevice(coordinator.target, "echo")
        enrolled.close()
        plan = device_pb2.GetPlanRequest(api_version=API_VERSION, participation=(
            device_pb2.Participation(device_id=enrolled.device_id, task_id="t" * 50_000,
                                     token="x")))
        code, msg = raw_call(channel, "/fedcoord.v1.DeviceService/GetPlan",
                             plan.SerializeToString())
        assert code == grpc.StatusCode.NOT_FOUND and "50000 characters" in msg
        assert len(msg) < 200
    finally:
        channel.close()


def stream(header: device_pb2.UpdateHeader, payload: bytes, *, then: bytes | None = None,
           hold: threading.Event | None = None) -> Iterator[device_pb2.UploadUpdateRequest]:
    """Header and every byte; then one more chunk (``then``), or no end of stream until
    ``hold`` is set."""
    yield device_pb2.UploadUpdateRequest(header=header)
    for i in range(0, len(payload), MIB):
        yield device_pb2.UploadUpdateRequest(chunk=payload[i:i + MIB])
    if then is not None:
        yield device_pb2.UploadUpdateRequest(chunk=then)
    if hold is not None:
        hold.wait(30)


def test_an_upload_counts_once_its_stream_ended_well_and_retries_get_its_answer(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    spec = load_task_file(write_task(tmp_path / "t.yaml", rounds=1, clients_per_round=2,
                                     min_reports=2, selection_window_s=1.0))
    with coordinator.admin() as admin:
        task_id = admin.create_task(spec).task_id
    a, b = RogueDevice(coordinator.target, "a"), RogueDevice(coordinator.target, "b")
    hold = threading.Event()
    try:
        a.join(task_id)
        b.join(task_id)
        payload = a.zero_update()

        def header(rogue: RogueDevice, upload_id: str) -> device_pb2.UpdateHeader:
            return device_pb2.UpdateHeader(
                api_version=API_VERSION, participation=rogue.participation, num_examples=10,
                tensors=list(rogue.plan.update_tensors), total_bytes=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(), upload_id=upload_id)

        # Every byte sent, then the client cancels before the end of the stream.
        call = a.stub.UploadUpdate.future(stream(header(a, "a" * 20), payload, hold=hold))
        time.sleep(1.0)
        call.cancel()
        # Every byte sent, then the deadline passes before the end of the stream.
        code, _ = status_of(lambda: b.stub.UploadUpdate(
            stream(header(b, "b" * 20), payload, hold=hold), timeout=1.0))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        # Every byte sent, then a message over the upload's per-message limit, or over gRPC's.
        for extra in (bytes(2 * MIB), bytes(65 * MIB)):
            code, msg = status_of(lambda extra=extra: b.stub.UploadUpdate(
                stream(header(b, "b" * 20), payload, then=extra), timeout=30))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (len(extra), msg)
        code, msg = status_of(lambda: b.upload(payload, upload_id="not an id"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "upload_id" in msg

        # None of them counted: the retries are accepted, not ALREADY_EXISTS.
        assert a.upload(payload, upload_id="a" * 20).message == "update accepted"
        again = a.upload(payload, upload_id="a" * 20)  # the client did not hear the answer
        assert again.accepted and "retry" in again.message
        code, _ = status_of(lambda: a.upload(payload, upload_id="another-upload-0001"))
        assert code == grpc.StatusCode.ALREADY_EXISTS
        assert b.upload(payload, upload_id="b" * 20).accepted
        # The round closed with both; a retry of an answered upload still hears "accepted".
        assert b.upload(payload, upload_id="b" * 20).accepted
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=60)
            rounds = admin.list_rounds(task_id)
        assert task.state == "completed", coordinator.log_text()
        assert [r.reports for r in rounds] == [2]
    finally:
        hold.set()
        a.close()
        b.close()
