"""`fedctl aggregator serve` as a real process: devices upload under tickets the coordinator
signed, the coordinator reads the progress and collects the partial sum over a real gRPC
channel; its calls need the admin token of the shard key; a bad key file stops the command
with a message naming the file."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ENV, FEDCTL

from core.shards import (
    ADMIN_METADATA,
    RoundKey,
    ShardMode,
    UploadTicket,
    admin_token,
    derive_shard_key,
    parse_key,
    sign_ticket,
    tensors_digest,
)
from core.types import API_VERSION
from protos import convert
from protos.fedcoord.v1 import aggregator_pb2, aggregator_pb2_grpc, device_pb2

pytestmark = pytest.mark.integration

VALUES = 1000
SHARD = 1


@dataclass
class Shard:
    proc: subprocess.Popen[bytes]
    port: int
    key: bytes
    log: Path
    master: bytes

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_shard(workdir: Path) -> Shard:
    """``fedctl aggregator serve`` on a free port, with its own key derived by ``aggregator
    keygen --master`` from a new master key."""
    master_file, key_file = workdir / "master.key", workdir / "shard.key"
    subprocess.run([*FEDCTL, "aggregator", "keygen", "--out", str(master_file)], env=ENV,
                   check=True, capture_output=True)
    subprocess.run([*FEDCTL, "aggregator", "keygen", "--master", str(master_file), "--index",
                    str(SHARD), "--out", str(key_file)], env=ENV, check=True,
                   capture_output=True)
    port_file, log = workdir / "port", workdir / "shard.log"
    proc = subprocess.Popen(
        [*FEDCTL, "aggregator", "serve", "--port", "0", "--index", str(SHARD),
         "--key-file", str(key_file), "--spool-dir", str(workdir / "spool"),
         "--port-file", str(port_file)],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV)  # noqa: SIM115
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the shard exited: {log.read_text()}")
        assert time.monotonic() < deadline, "the shard did not start in 180 s"
        time.sleep(0.05)
    return Shard(proc, int(port_file.read_text()), parse_key(key_file.read_bytes()), log,
                 parse_key(master_file.read_bytes()))


def stop_shard(shard: Shard) -> None:
    if shard.proc.poll() is None:
        shard.proc.send_signal(signal.SIGTERM)
        try:
            shard.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            shard.proc.kill()
            shard.proc.wait()


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shard]:
    running = start_shard(tmp_path_factory.mktemp("shard"))
    yield running
    stop_shard(running)


@pytest.fixture
def channel(shard: Shard) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(shard.target) as ch:
        yield ch


def ticket(key: RoundKey, device: str, **changes: object) -> UploadTicket:
    fields: dict[str, object] = dict(
        task_id=key.task_id, round_id=key.round_id, round_number=1, device_id=device,
        shard=SHARD, values=VALUES, mode=ShardMode.FEDAVG, weight_cap=50, clip_norm=0.0,
        max_update_l2_norm=math.inf, clear_metrics=True, adaptive_clipping=False,
        deadline=time.time() + 120, max_chunk_bytes=1 << 12, max_num_examples=1000,
        tensors=tensors_digest([]))
    fields.update(changes)
    return UploadTicket(**fields)  # type: ignore[arg-type]


def upload(channel: grpc.Channel, t: UploadTicket, update: np.ndarray, *, shard_key: bytes,
           num_examples: int, metrics: dict[str, float] | None = None
           ) -> device_pb2.UploadUpdateResponse:
    data = update.astype("<f4").tobytes()
    signed = sign_ticket(t, shard_key)
    header = device_pb2.UpdateHeader(
        api_version=API_VERSION,
        participation=device_pb2.Participation(device_id=t.device_id, task_id=t.task_id,
                                               round_number=t.round_number, token="tok"),
        num_examples=num_examples, total_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), metrics=metrics or {},
        ticket=convert.ticket_to_proto(signed))

    def messages() -> Iterator[device_pb2.UploadUpdateRequest]:
        yield device_pb2.UploadUpdateRequest(header=header)
        for start in range(0, len(data), 1000):  # cut inside float32 values
            yield device_pb2.UploadUpdateRequest(chunk=data[start:start + 1000])

    stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
    response: device_pb2.UploadUpdateResponse = stub.UploadUpdate(messages(), timeout=30)
    return response


def admin(shard: Shard) -> tuple[tuple[str, str], ...]:
    return ((ADMIN_METADATA, admin_token(shard.key)),)


def collect(channel: grpc.Channel, key: RoundKey, metadata: tuple[tuple[str, str], ...],
            max_chunk_bytes: int = 0) -> tuple[aggregator_pb2.PartialSumHeader, bytes, int]:
    stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
    header, chunks = None, []
    for message in stub.CollectRound(
            aggregator_pb2.CollectRoundRequest(round=convert.round_key_to_proto(key),
                                               max_chunk_bytes=max_chunk_bytes),
            metadata=metadata, timeout=30):
        if message.HasField("header"):
            header = message.header
        else:
            chunks.append(message.chunk)
    assert header is not None
    return header, b"".join(chunks), len(chunks)


def test_the_shard_serves_health(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fedcoord.v1.AggregatorService"):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_uploads_are_summed_and_collected_as_the_weighted_sum(
        shard: Shard, channel: grpc.Channel) -> None:
    key = RoundKey("task-sum", 7)
    rng = np.random.default_rng(5)
    updates = {f"dev-{i}": rng.normal(size=VALUES).astype(np.float32) for i in range(3)}
    examples = {"dev-0": 10, "dev-1": 80, "dev-2": 30}  # dev-1's weight is capped at 50
    for device, update in updates.items():
        answer = upload(channel, ticket(key, device), update, shard_key=shard.key,
                        num_examples=examples[device], metrics={"loss": 1.5})
        assert answer.accepted and answer.message == "update accepted"

    stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
    progress = stub.RoundProgress(
        aggregator_pb2.RoundProgressRequest(rounds=[convert.round_key_to_proto(key)]),
        metadata=admin(shard), timeout=10)
    (state,) = progress.rounds
    assert sorted(state.reported) == sorted(updates) and not state.collected

    header, data, messages = collect(channel, key, admin(shard), max_chunk_bytes=1024)
    part = convert.partial_sum_from_proto(header, data)
    weights = {d: float(min(n, 50)) for d, n in examples.items()}
    expected = sum(weights[d] * updates[d].astype(np.float64) for d in updates)
    np.testing.assert_allclose(part.total, expected, rtol=1e-12)
    assert part.weight == sum(weights.values())
    assert part.metric_sums == {"loss": pytest.approx(1.5 * part.weight)}
    assert sorted(part.reported) == sorted(updates)
    assert messages == math.ceil(8 * VALUES / 1024)

    again, data_again, _ = collect(channel, key, admin(shard))
    assert again.sha256 == header.sha256 and data_again == data
    with pytest.raises(grpc.RpcError) as late:
        upload(channel, ticket(key, "dev-9"), updates["dev-0"], shard_key=shard.key,
               num_examples=5)
    assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was collected" in (late.value.details() or "")

    stub.DropRound(aggregator_pb2.DropRoundRequest(round=convert.round_key_to_proto(key)),
                   metadata=admin(shard), timeout=10)
    with pytest.raises(grpc.RpcError) as gone:
        collect(channel, key, admin(shard))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_second_update_of_a_device_is_already_exists(shard: Shard,
                                                       channel: grpc.Channel) -> None:
    key = RoundKey("task-dup", 1)
    update = np.ones(VALUES, dtype=np.float32)
    upload(channel, ticket(key, "dev-a"), update, shard_key=shard.key, num_examples=3)
    with pytest.raises(grpc.RpcError) as twice:
        upload(channel, ticket(key, "dev-a"), update, shard_key=shard.key, num_examples=3)
    assert twice.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_ticket_signed_with_another_key_is_unauthenticated(
        shard: Shard, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        upload(channel, ticket(RoundKey("task-forged", 1), "dev-a"),
               np.zeros(VALUES, np.float32), shard_key=os.urandom(32), num_examples=1)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not verify" in (refused.value.details() or "")


def test_a_ticket_for_another_shard_is_permission_denied(
        shard: Shard, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        upload(channel, ticket(RoundKey("task-other", 1), "dev-a", shard=0),
               np.zeros(VALUES, np.float32), shard_key=shard.key, num_examples=1)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "for aggregator shard 0; this is shard 1" in (refused.value.details() or "")


@pytest.mark.parametrize("metadata", [(), ((ADMIN_METADATA, "0" * 64),)],
                         ids=["no token", "wrong token"])
def test_the_coordinators_calls_need_its_admin_token(
        channel: grpc.Channel, metadata: tuple[tuple[str, str], ...]) -> None:
    stub = aggregator_pb2_grpc.AggregatorServiceStub(channel)
    key = convert.round_key_to_proto(RoundKey("task-sum", 7))
    calls = [
        lambda: stub.RoundProgress(aggregator_pb2.RoundProgressRequest(rounds=[key]),
                                   metadata=metadata, timeout=10),
        lambda: collect(channel, RoundKey("task-sum", 7), metadata),
        lambda: stub.DropRound(aggregator_pb2.DropRoundRequest(round=key),
                               metadata=metadata, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ADMIN_METADATA in (refused.value.details() or "")


def test_a_bad_key_file_is_a_usage_error_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "short.key"
    bad.write_text("abcd\n")
    missing = tmp_path / "missing.key"
    for key_file, reason in ((bad, "a shard key is 32 bytes or 64 hex characters"),
                             (missing, "cannot read it")):
        done = subprocess.run(
            [*FEDCTL, "aggregator", "serve", "--index", "0", "--key-file", str(key_file),
             "--spool-dir", str(tmp_path / "spool")],
            env=ENV, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert f"--key-file {key_file}: " in done.stderr and reason in done.stderr


def test_keygen_writes_a_private_key_file_and_never_overwrites_it(tmp_path: Path) -> None:
    out = tmp_path / "new.key"
    first = subprocess.run([*FEDCTL, "aggregator", "keygen", "--out", str(out)], env=ENV,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = parse_key(out.read_bytes())
    again = subprocess.run([*FEDCTL, "aggregator", "keygen", "--out", str(out)], env=ENV,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
    assert parse_key(out.read_bytes()) == key


def test_keygen_derives_each_shards_own_key_from_the_master(tmp_path: Path) -> None:
    master, own = tmp_path / "master.key", tmp_path / "shard-3.key"
    for args in (["--out", str(master)],
                 ["--master", str(master), "--index", "3", "--out", str(own)]):
        made = subprocess.run([*FEDCTL, "aggregator", "keygen", *args], env=ENV,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert parse_key(own.read_bytes()) == derive_shard_key(parse_key(master.read_bytes()), 3)
    assert derive_shard_key(parse_key(master.read_bytes()), 2) != parse_key(own.read_bytes())
    half = subprocess.run([*FEDCTL, "aggregator", "keygen", "--master", str(master), "--out",
                           str(tmp_path / "x.key")], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert half.returncode == 2 and "--master and --index go together" in half.stderr


def test_a_ticket_signed_for_another_shard_does_not_verify_here(
        channel: grpc.Channel, shard: Shard) -> None:
    """A shard holds only its own key: another shard's key (one a compromised shard holds)
    makes tickets this one refuses, even when they name this shard."""
    assert shard.key == derive_shard_key(shard.master, SHARD)
    other = derive_shard_key(shard.master, SHARD + 1)
    t = ticket(RoundKey("task-other-key", 1), "dev-x")
    with pytest.raises(grpc.RpcError) as info:
        upload(channel, t, np.ones(VALUES, np.float32), shard_key=other, num_examples=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sigterm_stops_the_shard_cleanly(tmp_path: Path) -> None:
    own = start_shard(tmp_path)
    try:
        own.proc.send_signal(signal.SIGTERM)
        assert own.proc.wait(timeout=20) == 0
        assert "aggregator shard 1 listening on 127.0.0.1:" in own.log.read_text()
    finally:
        stop_shard(own)
