"""What leaves a device of a secure-aggregation task, read off the wire: real agent processes
talk to the real coordinator process through a tap that records every request byte for byte.
No request carries a device's metrics or example count in the clear (they ride inside the
masked vector), no update is uploaded in the clear, and no stored participant row keeps a
metric or an example count; the round releases the masked sums' means."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import (
    CoordinatorProcess,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from core.taskspec import load_task_file
from protos.fedcoord.v1 import device_pb2

pytestmark = pytest.mark.integration

SECURE = ("secure_aggregation: {protocol: secagg, threshold: 0.6, dropout: 0.001, clip: 0.5, "
          "phase_timeout_s: 8}\n")
#: One agent process hosts every device (a process costs seconds of start-up: torch); the
#: tap sees each device's requests all the same.
PROCESSES, PER_PROCESS = 1, 6
DEVICES = PROCESSES * PER_PROCESS


class Tap(grpc.GenericRpcHandler):
    """Forwards every DeviceService call to ``target`` unchanged and keeps each request's
    bytes by method name."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self.requests: dict[str, list[bytes]] = defaultdict(list)
        self._lock = threading.Lock()
        self._methods = {
            f"/fedcoord.v1.DeviceService/{m.name}": m
            for m in device_pb2.DESCRIPTOR.services_by_name["DeviceService"].methods
        }

    def _keep(self, name: str, data: bytes) -> None:
        with self._lock:
            self.requests[name].append(data)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = self._methods.get(details.method)
        if method is None:
            return None
        name, path = method.name, details.method
        if method.client_streaming:
            call = self._channel.stream_unary(path)

            def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
                def kept() -> Iterator[bytes]:
                    for r in requests:
                        self._keep(name, r)
                        yield r
                return _forward(context, lambda: call(kept(), timeout=120))
            return grpc.stream_unary_rpc_method_handler(stream_unary)
        if method.server_streaming:
            stream = self._channel.unary_stream(path)

            def unary_stream(request: bytes, context: grpc.ServicerContext) -> Any:
                self._keep(name, request)
                try:
                    yield from stream(request, timeout=120)
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details())
            return grpc.unary_stream_rpc_method_handler(unary_stream)
        unary = self._channel.unary_unary(path)

        def unary_unary(request: bytes, context: grpc.ServicerContext) -> Any:
            self._keep(name, request)
            return _forward(context, lambda: unary(request, timeout=120))
        return grpc.unary_unary_rpc_method_handler(unary_unary)

    def parsed(self, name: str) -> list[Any]:
        method = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].methods_by_name[name]
        cls = getattr(device_pb2, method.input_type.name)
        return [cls.FromString(b) for b in self.requests.get(name, [])]


def _forward(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except grpc.RpcError as exc:
        context.abort(exc.code(), exc.details())


def test_a_secure_task_sends_and_keeps_nothing_per_device_in_the_clear(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    tap = Tap(coordinator.target)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[tap])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    task_file = write_task(tmp_path / "wire.yaml", name="wire", rounds=2,
                           clients_per_round=DEVICES, min_reports=4, extra=SECURE)
    with coordinator.admin() as client:  # in this process: a fedctl costs seconds of imports
        task_id = client.create_task(load_task_file(task_file)).task_id
    agents = [start_agent(f"127.0.0.1:{port}", f"w{i}-",
                          f"digits:shard={PER_PROCESS * i}/{DEVICES},dirichlet=0.5",
                          devices=PER_PROCESS, task_id=task_id, log=tmp_path / f"w{i}.log")
              for i in range(PROCESSES)]
    try:
        with coordinator.admin() as client:
            task = wait_for_task(client, task_id)
            rounds = [r for r in client.list_rounds(task_id) if r.state == "committed"]
    finally:
        stop_all(agents)
        server.stop(1)
    assert task.state == "completed", coordinator.log_text()
    assert task.metrics_release == "masked"

    # On the wire: masked vectors only; no metric, no example count, no clear upload.
    masked = tap.parsed("SecAggMaskedInput")
    assert len(masked) >= 2 * 4 and all(len(m.masked_input) > 0 for m in masked)
    assert all(len(m.metrics) == 0 for m in masked)
    assert tap.parsed("UploadUpdate") == []
    assert all(len(r.metrics) == 0 for r in tap.parsed("ReportStatus"))
    plans = tap.parsed("GetPlan")
    assert plans  # the devices asked for their plans through the tap

    # In the database: no participant row keeps a metric or an example count.
    db = sqlite3.connect(coordinator.db_url.removeprefix("sqlite:///"))
    rows = db.execute("SELECT num_examples, metrics_json FROM participants").fetchall()
    assert rows and all(n == 0 and json.loads(m or "{}") == {} for n, m in rows)

    # Released: the means of the masked sums (train loss of every survivor, evaluation of
    # those that evaluated), the weight total, and the protocol's public facts.
    for r in rounds:
        assert 0 < r.metrics["train_loss"] < 20 and r.metrics["examples"] > 0
        assert 0 <= r.metrics.get("eval_accuracy", 0.5) <= 1.0 + r.metrics["secagg_max_error"]
