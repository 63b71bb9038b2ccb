"""AggregatorService in process (EmbeddedAggregator, a real gRPC server on port 0): the
statuses a device or a caller gets for what the shard refuses, uploads in parallel adding
up exactly, and the transport security rules."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.shard_app import AggregatorSettings, AggregatorShard, EmbeddedAggregator
from core.shards import (
    ADMIN_METADATA,
    RoundKey,
    ShardMode,
    UploadTicket,
    admin_token,
    sign_ticket,
    tensors_digest,
)
from core.tls import TlsError, write_local_ca
from core.types import API_VERSION
from protos import convert
from protos.fedcoord.v1 import aggregator_pb2, aggregator_pb2_grpc, device_pb2

KEY = bytes(range(32))
NOW = 1_700_000_000.0
VALUES = 64
ROUND = RoundKey("task-s", 5)
ADMIN = ((ADMIN_METADATA, admin_token(KEY)),)
Stub = aggregator_pb2_grpc.AggregatorServiceStub


def ticket(device: str, **changes: object) -> UploadTicket:
    fields: dict[str, object] = dict(
        task_id=ROUND.task_id, round_id=ROUND.round_id, round_number=2, device_id=device,
        shard=0, values=VALUES, mode=ShardMode.FEDAVG, weight_cap=100, clip_norm=0.0,
        max_update_l2_norm=math.inf, clear_metrics=True, adaptive_clipping=False,
        deadline=NOW + 60, max_chunk_bytes=64, max_num_examples=1000,
        tensors=tensors_digest([]))
    fields.update(changes)
    return UploadTicket(**fields)  # type: ignore[arg-type]


def header(t: UploadTicket, data: bytes, **changes: object) -> device_pb2.UpdateHeader:
    msg = device_pb2.UpdateHeader(
        api_version=API_VERSION,
        participation=device_pb2.Participation(device_id=t.device_id, task_id=t.task_id,
                                               round_number=t.round_number),
        num_examples=4, total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
        ticket=convert.ticket_to_proto(sign_ticket(t, KEY)))
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


def stream(first: device_pb2.UpdateHeader | None, data: bytes, chunk: int = 64
           ) -> Iterator[device_pb2.UploadUpdateRequest]:
    if first is not None:
        yield device_pb2.UploadUpdateRequest(header=first)
    for start in range(0, len(data), chunk):
        yield device_pb2.UploadUpdateRequest(chunk=data[start:start + chunk])


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def shard(tmp_path: Path, clock: ManualClock) -> Iterator[EmbeddedAggregator]:
    settings = AggregatorSettings(index=0, key=KEY, spool_dir=tmp_path / "spool", port=0,
                                  upload_idle_timeout_s=0.5)
    with EmbeddedAggregator(settings, clock) as running:
        yield running


@pytest.fixture
def stub(shard: EmbeddedAggregator) -> Iterator[Stub]:
    with grpc.insecure_channel(f"127.0.0.1:{shard.port}") as channel:
        yield aggregator_pb2_grpc.AggregatorServiceStub(channel)


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as refused:
        call()  # type: ignore[operator]
    return refused.value.code(), refused.value.details() or ""


def test_an_upload_that_starts_without_a_header_is_invalid(stub: Stub) -> None:
    code, details = code_of(lambda: stub.UploadUpdate(stream(None, b"\0" * 8), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "must start with an UpdateHeader" in details


def test_another_api_version_is_failed_precondition(stub: Stub) -> None:
    data = np.zeros(VALUES, "<f4").tobytes()
    first = header(ticket("dev-a"), data, api_version=API_VERSION + 1)
    code, details = code_of(lambda: stub.UploadUpdate(stream(first, data), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "upgrade the client" in details


def test_a_ticket_past_its_deadline_is_failed_precondition(
        stub: Stub, clock: ManualClock) -> None:
    clock.advance(61)
    data = np.zeros(VALUES, "<f4").tobytes()
    code, details = code_of(
        lambda: stub.UploadUpdate(stream(header(ticket("dev-a"), data), data), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "deadline" in details


def test_a_chunk_over_the_tickets_limit_is_invalid(stub: Stub) -> None:
    data = np.zeros(VALUES, "<f4").tobytes()
    first = header(ticket("dev-a"), data)
    code, details = code_of(lambda: stub.UploadUpdate(stream(first, data, 128), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the maximum chunk size of 64 bytes" in details


def test_a_stalled_upload_is_cut_off(stub: Stub) -> None:
    data = np.zeros(VALUES, "<f4").tobytes()
    first = header(ticket("dev-a"), data)

    def stalls() -> Iterator[device_pb2.UploadUpdateRequest]:
        yield device_pb2.UploadUpdateRequest(header=first)
        time.sleep(2)

    code, details = code_of(lambda: stub.UploadUpdate(stalls(), timeout=10))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no upload data" in details


def test_collecting_an_unknown_round_is_not_found(stub: Stub) -> None:
    request = aggregator_pb2.CollectRoundRequest(round=convert.round_key_to_proto(ROUND))
    code, details = code_of(lambda: list(stub.CollectRound(request, metadata=ADMIN,
                                                           timeout=10)))
    assert code == grpc.StatusCode.NOT_FOUND and "took no upload" in details


def test_uploads_in_parallel_add_up_exactly(
        stub: Stub, shard: EmbeddedAggregator) -> None:
    rng = np.random.default_rng(1)
    updates = {f"dev-{i}": rng.normal(size=VALUES).astype("<f4") for i in range(16)}
    errors: list[BaseException] = []

    def send(device: str) -> None:
        data = updates[device].tobytes()
        try:
            stub.UploadUpdate(stream(header(ticket(device), data), data), timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(d,)) for d in updates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    request = aggregator_pb2.CollectRoundRequest(round=convert.round_key_to_proto(ROUND))
    messages = list(stub.CollectRound(request, metadata=ADMIN, timeout=30))
    part = convert.partial_sum_from_proto(
        messages[0].header, b"".join(m.chunk for m in messages[1:]))
    expected = sum(4.0 * u.astype(np.float64) for u in updates.values())
    np.testing.assert_allclose(part.total, expected, rtol=1e-12)
    assert sorted(part.reported) == sorted(updates) and part.weight == 64.0
    assert not any((shard.settings.spool_dir).iterdir()), "every spool file was removed"


def test_plaintext_is_refused_off_loopback_and_tls_is_served(tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="refusing to serve plaintext on 0.0.0.0"):
        AggregatorShard(AggregatorSettings(index=0, key=KEY, spool_dir=tmp_path / "s",
                                           host="0.0.0.0"))
    files = write_local_ca(tmp_path / "tls")
    settings = AggregatorSettings(index=0, key=KEY, spool_dir=tmp_path / "s", port=0,
                                  tls_dir=tmp_path / "tls")
    with EmbeddedAggregator(settings) as running:
        credentials = grpc.ssl_channel_credentials(files.ca_cert.read_bytes())
        with grpc.secure_channel(f"localhost:{running.port}", credentials) as channel:
            answer = aggregator_pb2_grpc.AggregatorServiceStub(channel).RoundProgress(
                aggregator_pb2.RoundProgressRequest(), metadata=ADMIN, timeout=10)
    assert list(answer.rounds) == []
