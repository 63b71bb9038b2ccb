"""The HTTP side port of a real coordinator process (``serve --http-port``): probes, Prometheus
metrics that move with a real task run by an agent process, and the gRPC health and
reflection services beside the device and admin services."""

from __future__ import annotations

import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import (
    CoordinatorProcess,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)
from prometheus_client.parser import text_string_to_metric_families

from core.taskspec import load_task_file

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return sum(v for (n, ls), v in values.items()
               if n == name and set(labels.items()) <= ls)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CoordinatorProcess, str]]:
    """One coordinator for the module (starting one takes seconds); only the first test
    runs a task."""
    coordinator = CoordinatorProcess(tmp_path_factory.mktemp("coordinator"))
    http_port = free_port()
    coordinator.start(["--http-port", str(http_port), "--log-format", "json"])
    yield coordinator, f"http://127.0.0.1:{http_port}"
    coordinator.stop()


def test_probes_and_metrics_follow_a_real_task(served: tuple[CoordinatorProcess, str],
                                               tmp_path: Path) -> None:
    coordinator, base = served
    assert get(f"{base}/healthz")[0] == 200
    assert get(f"{base}/readyz") == (200, "ready\n")
    before = samples(base)
    assert total(before, "fedcoord_rounds_committed_total") == 0

    task_file = write_task(tmp_path / "task.yaml", rounds=2, clients_per_round=3,
                           min_reports=2)
    with coordinator.admin() as client:  # in this process: a fedctl costs seconds of imports
        task_id = client.create_task(load_task_file(task_file)).task_id
    agent = start_agent(coordinator.target, "agent0", "digits:shard=0/3", devices=3,
                        task_id=task_id, log=tmp_path / "agent.log")
    try:
        with coordinator.admin() as client:
            task = wait_for_task(client, task_id, timeout_s=180)
    finally:
        stop_all([agent])
    assert task.state == "completed", (tmp_path / "agent.log").read_text()

    after = samples(base)
    assert total(after, "fedcoord_tasks_created_total") == 1
    assert total(after, "fedcoord_rounds_opened_total", task=task_id) >= 2
    assert total(after, "fedcoord_rounds_committed_total", task=task_id) == 2
    assert total(after, "fedcoord_round_duration_seconds_count", outcome="committed") == 2
    assert total(after, "fedcoord_reports_accepted_total", task=task_id) >= 4
    assert total(after, "fedcoord_devices_selected_total", task=task_id) >= 4
    assert total(after, "fedcoord_checkins_total", task=task_id) >= 6
    assert total(after, "fedcoord_tasks_ended_total", reason="completed") == 1
    assert total(after, "fedcoord_tasks", state="completed") == 1
    assert total(after, "fedcoord_active_devices") == 3
    assert total(after, "fedcoord_store_call_seconds_count", op="commit_round") == 2
    assert total(after, "fedcoord_commit_seconds_count") == 2
    # Every admitted device downloaded the model and uploaded an update (float32 weights).
    assert total(after, "fedcoord_bytes_sent_total") >= 4 * 4 * 650
    assert total(after, "fedcoord_bytes_received_total") >= 4 * 4 * 650
    assert not any("agent0" in v for _, labels in after for _, v in labels)

    lines = [line for line in coordinator.log_text().splitlines() if line.startswith("{")]
    assert lines and all('"level"' in line and '"logger"' in line for line in lines)


def test_grpc_health_and_reflection_answer_without_credentials(
        served: tuple[CoordinatorProcess, str]) -> None:
    coordinator, _ = served
    with grpc.insecure_channel(coordinator.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedcoord.v1.DeviceService", "fedcoord.v1.AdminService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"fedcoord.v1.DeviceService", "fedcoord.v1.AdminService",
                "grpc.health.v1.Health"} <= names
        # Reflection describes the wire contract only: the admin calls still need a token.
        described = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="fedcoord.v1.AdminService")
        (file_response,) = list(reflection.ServerReflectionInfo(iter([described]), timeout=10))
        assert file_response.file_descriptor_response.file_descriptor_proto


def test_readyz_is_503_while_the_database_does_not_answer(
        served: tuple[CoordinatorProcess, str]) -> None:
    coordinator, base = served
    assert get(f"{base}/readyz")[0] == 200
    db = coordinator.db_url.removeprefix("sqlite:///")
    # Holding SQLite's write lock: the coordinator's transactions (BEGIN IMMEDIATE) wait.
    lock = sqlite3.connect(db, timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        status, body = get(f"{base}/readyz")
        assert status == 503 and "did not answer" in body
        assert time.monotonic() - started < 8, "the probe gives up, not the database"
        assert get(f"{base}/healthz")[0] == 200, "liveness does not wait on the database"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    deadline = time.monotonic() + 15
    while get(f"{base}/readyz")[0] != 200:
        assert time.monotonic() < deadline, "ready again once the database answers"
        time.sleep(0.2)
