"""1,000 virtual devices checking in concurrently: check-ins per second against a bare
grpc.aio unary call of the same request size. Prints one JSON line.

    python benchmarks/checkin.py [--devices 1000] [--calls-per-device 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from benchmarks._common import BareServer, CoordinatorSubprocess  # noqa: E402
from core.types import API_VERSION, ModelSpec, TaskSpec  # noqa: E402
from fedctl.admin import AdminClient  # noqa: E402
from protos.fedcoord.v1 import common_pb2, device_pb2, device_pb2_grpc  # noqa: E402


def request(i: int, task_id: str) -> device_pb2.CheckInRequest:
    return device_pb2.CheckInRequest(
        api_version=API_VERSION, device_id=f"bench-device-{i:06d}", task_id=task_id,
        attributes=common_pb2.DeviceAttributes(charging=True, unmetered=True, idle=True,
                                               population="default"))


async def drive(call, devices: int, per_device: int, channels: int) -> float:  # type: ignore[no-untyped-def]
    """Runs devices x per_device calls with `devices` concurrent callers; returns calls/s."""
    async def device(i: int) -> None:
        for _ in range(per_device):
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(device(i) for i in range(devices)))
    return devices * per_device / (time.perf_counter() - start)


async def ours(target: str, task_id: str, devices: int, per_device: int, channels: int) -> float:
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in chans]
    reqs = [request(i, task_id) for i in range(devices)]

    async def call(i: int) -> None:
        resp = await stubs[i % channels].CheckIn(reqs[i], timeout=60)
        assert resp.outcome != device_pb2.CheckInResponse.OUTCOME_UNSPECIFIED

    await drive(call, devices, 1, channels)  # warm-up: every device known once
    rate = await drive(call, devices, per_device, channels)
    for c in chans:
        await c.close()
    return rate


async def bare(target: str, size: int, devices: int, per_device: int, channels: int) -> float:
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    calls = [c.unary_unary("/bare.Bare/Unary") for c in chans]
    payload = bytes(size)

    async def call(i: int) -> None:
        await calls[i % channels](payload, timeout=60)

    await drive(call, devices, 1, channels)
    rate = await drive(call, devices, per_device, channels)
    for c in chans:
        await c.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--calls-per-device", type=int, default=5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; medians reported")
    args = parser.parse_args()
    spec = TaskSpec(name="bench-checkin",
                    model=ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10}),
                    rounds=1, clients_per_round=100, min_reports=100, over_selection=1.0,
                    round_deadline_s=3600, selection_window_s=3000)
    with CoordinatorSubprocess() as coord:
        with AdminClient(coord.target) as admin:
            task_id = admin.create_task(spec).task_id
        ours_rates = [asyncio.run(ours(coord.target, task_id, args.devices,
                                       args.calls_per_device, args.channels))
                      for _ in range(args.repeats)]
    size = request(0, task_id).ByteSize()
    with BareServer() as server:
        bare_rates = [asyncio.run(bare(server.target, size, args.devices,
                                       args.calls_per_device, args.channels))
                      for _ in range(args.repeats)]
    ours_rate, bare_rate = statistics.median(ours_rates), statistics.median(bare_rates)
    print(json.dumps({
        "benchmark": "checkin",
        "devices": args.devices,
        "calls": args.devices * args.calls_per_device,
        "checkins_per_s": round(ours_rate, 1),
        "bare_grpc_aio_unary_per_s": round(bare_rate, 1),
        "ratio_to_bare": round(ours_rate / bare_rate, 3),
        "request_bytes": size,
        "target_ratio": 0.5,
    }))


if __name__ == "__main__":
    main()
