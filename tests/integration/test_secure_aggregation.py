"""Secure aggregation over real gRPC with agent processes: the coordinator only ever sees
masked vectors, yet reaches the model plaintext FedAvg reaches; agents killed in the middle of
the protocol do not stop the round."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import (
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)
from rogue import RogueDevice

from core.protocol import Participation, config_hash
from core.secagg.client import SecAggClient
from core.secagg.encoding import encode_update, masked_metric_values
from core.secagg.messages import MaskedInputRequest
from core.taskspec import load_task_file
from core.tensors import load_safetensors
from core.types import API_VERSION
from device_agent.runtime.faults import FAULT_ENV
from device_agent.transport.client import DeviceClient
from protos import convert
from protos.fedcoord.v1 import device_pb2

pytestmark = pytest.mark.integration

SECURE = ("secure_aggregation: {protocol: secagg, threshold: 0.6, dropout: 0.001, clip: 0.5, "
          "phase_timeout_s: 8}\n")
DEVICES = 8
#: Devices per agent process (each process costs seconds of start-up: torch, so the
#: plaintext and secure runs host all eight in one). The kill test puts two in the process
#: that dies, so the six left still reach min_reports and threshold.
EVEN, KILLED_FIRST = (8,), (2, 6)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests (each makes and looks at its own tasks and agents)."""
    yield from shared_coordinator(tmp_path_factory)


def fedctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def start_agents(coordinator: CoordinatorProcess, tmp_path: Path, name: str, *,
                 task_id: str | None = None, crash_at: str | None = None,
                 layout: tuple[int, ...] = EVEN) -> list[subprocess.Popen[bytes]]:
    """The module's devices in ``layout``'s processes; with ``task_id`` they exit when that
    task ends, without it they serve whatever task their population runs."""
    assert sum(layout) == DEVICES
    return [
        start_agent(coordinator.target, f"a{i}-",  # same ids: same local shuffles
                    f"digits:shard={sum(layout[:i])}/{DEVICES},dirichlet=0.5",
                    devices=n, task_id=task_id, log=tmp_path / f"{name}-agent{i}.log",
                    verbose=True,
                    # The first process SIGKILLs itself when a device reaches crash_at.
                    env={FAULT_ENV: crash_at} if crash_at and i == 0 else None)
        for i, n in enumerate(layout)
    ]


def launch(coordinator: CoordinatorProcess, tmp_path: Path, name: str, extra: str, *,
           rounds: int = 2, deadline: int = 60) -> str:
    task_file = write_task(tmp_path / f"{name}.yaml", name=name, rounds=rounds,
                           clients_per_round=DEVICES, min_reports=5,
                           round_deadline_s=deadline, extra=extra)
    # In this process: the CLI's launch is tested elsewhere; a fedctl process costs a second
    # or two of imports.
    with coordinator.admin() as admin:
        return admin.create_task(load_task_file(task_file)).task_id


def completed_rounds(coordinator: CoordinatorProcess, task_id: str) -> list[object]:
    """Waits until the task ends; its rounds, once it has completed."""
    with coordinator.admin() as client:
        task = wait_for_task(client, task_id)
        rounds_seen = list(client.list_rounds(task_id))
    assert task.state == "completed", coordinator.log_text()
    return rounds_seen


def pull(coordinator: CoordinatorProcess, task_id: str, out: Path) -> dict[str, np.ndarray]:
    pulled = fedctl("model", "pull", task_id, "-o", str(out), "--coordinator",
                    coordinator.target)
    assert pulled.returncode == 0, pulled.stderr
    return load_safetensors(out.read_bytes())


def test_secure_aggregation_reaches_the_plaintext_model(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    # One agent process runs both tasks, one after the other (a process costs seconds of
    # start-up: torch): the same devices, so the same local shuffles.
    plain_id = launch(coordinator, tmp_path, "plain", "")
    agents = start_agents(coordinator, tmp_path, "both")
    try:
        completed_rounds(coordinator, plain_id)
        secure_id = launch(coordinator, tmp_path, "secure", SECURE)
        rounds = completed_rounds(coordinator, secure_id)
    finally:
        stop_all(agents)
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
    # One round: the kill is in it, and it commits with the survivors. (A second round
    # proved nothing more and cost a round deadline: its goal of 8 seats, with 6 devices
    # left, holds the advertisement stage open until the deadline.) The default deadline
    # leaves the agents all the time they need to start on a loaded machine.
    task_id = launch(coordinator, tmp_path, "killed", SECURE, rounds=1)
    agents = start_agents(coordinator, tmp_path, "killed", task_id=task_id,
                          crash_at="secagg.masked_input@1", layout=KILLED_FIRST)
    try:
        rounds = completed_rounds(coordinator, task_id)
    finally:
        stop_all(agents)
    committed = [r for r in rounds if r.state == "committed"]  # type: ignore[attr-defined]
    assert len(committed) == 1
    first = committed[0]
    assert first.round_number == 1  # type: ignore[attr-defined]
    m = first.metrics  # type: ignore[attr-defined]
    lost = DEVICES - m["reports"]
    assert 1 <= lost <= KILLED_FIRST[0], "the killed process's devices dropped out"
    assert m["secagg_dropped"] >= 1, "a device died after sharing its keys: its masks removed"
    assert m["secagg_threshold"] <= m["reports"]
    assert 0 <= m["server_eval_accuracy"] <= 1


class HandDriven:
    """A selected device speaking the SecAgg RPCs in raw protobuf, one stage at a time."""

    def __init__(self, target: str, device_id: str, task_id: str) -> None:
        self.rogue = RogueDevice(target, device_id)
        self.rogue.join(task_id)
        m = self.rogue.participation
        assert m is not None
        self.msg = m
        client = DeviceClient(target)
        try:
            plan = client.get_plan(Participation(m.device_id, m.task_id, m.round_number, m.token))
        finally:
            client.close()
        assert plan.secure_aggregation is not None
        self.sa = plan.secure_aggregation
        self.client = SecAggClient(self.sa.params, self.sa.context, config_hash(plan))
        self.size = sum(t.numel for t in plan.update_tensors)
        self.stub = self.rogue.stub

    def advertise(self) -> device_pb2.SecAggShareKeysInstruction:
        ad = self.client.advertise()
        return self.stub.SecAggAdvertiseKeys(device_pb2.SecAggAdvertiseKeysRequest(
            api_version=API_VERSION, participation=self.msg,
            encryption_public_key=ad.encryption_public, mask_public_key=ad.mask_public,
            config_hash=ad.config_hash), timeout=30)

    def finish(self, instruction: device_pb2.SecAggShareKeysInstruction) -> None:
        share = self.client.share_keys(convert.share_keys_instruction_from_proto(instruction))
        mask_req = self.stub.SecAggShareKeys(device_pb2.SecAggShareKeysRequest(
            api_version=API_VERSION, participation=self.msg,
            ciphertexts=convert.ciphertexts_to_proto(share.ciphertexts)), timeout=30)
        # The plan says MASKED: the device's metrics ride inside the vector (none here).
        values = np.append(np.zeros(self.size), masked_metric_values({}, self.sa.params.clip))
        enc = encode_update(values, 10, self.sa.params, np.random.default_rng(0))
        masked = self.client.mask(
            MaskedInputRequest(convert.ciphertexts_from_proto(mask_req.ciphertexts)), enc.vector)
        unmask_req = self.stub.SecAggMaskedInput(device_pb2.SecAggMaskedInputRequest(
            api_version=API_VERSION, participation=self.msg,
            masked_input=convert.ring_vector_to_bytes(masked)), timeout=30)
        response = self.client.unmask(convert.unmask_instruction_from_proto(unmask_req))
        self.stub.SecAggUnmask(device_pb2.SecAggUnmaskRequest(
            api_version=API_VERSION, participation=self.msg,
            seed_shares=convert.shares_to_proto(response.seed_shares),
            key_shares=convert.shares_to_proto(response.key_shares)), timeout=30)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()  # type: ignore[attr-defined]
    return code


def in_parallel(*calls: Callable[[], None]) -> None:
    threads = [threading.Thread(target=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)


def test_out_of_order_replayed_and_forged_messages_get_clear_statuses_over_grpc(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    task_file = write_task(tmp_path / "rogue.yaml", name="rogue", rounds=1, clients_per_round=3,
                           min_reports=3, extra="secure_aggregation: {protocol: secagg, "
                           "dropout: 0.0001, phase_timeout_s: 20}\n")
    with coordinator.admin() as admin:
        task_id = admin.create_task(load_task_file(task_file)).task_id
    devices: list[HandDriven] = []
    in_parallel(*(lambda i=i: devices.append(HandDriven(coordinator.target, f"r{i}", task_id))
                  for i in range(3)))
    d0 = devices[0]
    assert status_of(lambda: d0.stub.SecAggShareKeys(device_pb2.SecAggShareKeysRequest(
        api_version=API_VERSION, participation=d0.msg), timeout=10)
    ) == grpc.StatusCode.FAILED_PRECONDITION  # before its stage
    assert status_of(lambda: d0.rogue.upload(d0.rogue.zero_update())
                     ) == grpc.StatusCode.INVALID_ARGUMENT  # never in the clear

    instructions: dict[int, device_pb2.SecAggShareKeysInstruction] = {}

    def advertise(i: int) -> None:
        instructions[i] = devices[i].advertise()

    first = threading.Thread(target=advertise, args=(0,))
    first.start()
    time.sleep(1.0)  # d0's advertisement is in and waiting: a second one is a replay
    assert status_of(lambda: d0.stub.SecAggAdvertiseKeys(device_pb2.SecAggAdvertiseKeysRequest(
        api_version=API_VERSION, participation=d0.msg, encryption_public_key=b"k" * 32,
        mask_public_key=b"m" * 32, config_hash=b"h" * 32), timeout=10)
    ) == grpc.StatusCode.ALREADY_EXISTS
    in_parallel(lambda: advertise(1), lambda: advertise(2))
    first.join(timeout=30)
    assert len(instructions) == 3
    # Shares addressed to a stranger are refused, and the round goes on for everyone.
    assert status_of(lambda: d0.stub.SecAggShareKeys(device_pb2.SecAggShareKeysRequest(
        api_version=API_VERSION, participation=d0.msg,
        ciphertexts=[device_pb2.SecAggCiphertext(peer=99, ciphertext=b"x" * 40)]), timeout=10)
    ) == grpc.StatusCode.INVALID_ARGUMENT
    in_parallel(*(lambda i=i: devices[i].finish(instructions[i]) for i in range(3)))
    with coordinator.admin() as client:
        task = wait_for_task(client, task_id, timeout_s=60)
    assert task.state == "completed", coordinator.log_text()
    for d in devices:
        d.rogue.close()
