"""1,000 virtual devices checking in concurrently: check-ins per second against a bare
grpc.aio unary call of the same request size, and the same check-ins over TLS. Prints one
JSON line.

The plaintext and the TLS coordinator run side by side and their repeats alternate, so both
see the same machine. Devices share a few long-lived channels, as an agent process's devices
share one: the TLS handshake is paid once per channel (in the warm-up pass) and amortized;
``first_call_ms`` reports what one fresh channel's first call costs on each.

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
from core.tls import ClientTls  # noqa: E402
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


def aio_channel(target: str, tls: ClientTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(tls.ca_pem))


async def ours(target: str, task_id: str, devices: int, per_device: int, channels: int,
               tls: ClientTls | None = None) -> float:
    chans = [aio_channel(target, tls) for _ in range(channels)]
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


async def first_call_ms(target: str, task_id: str, tls: ClientTls | None,
                        samples: int = 20) -> float:
    """Median time from a new channel to its first check-in's answer (connect, handshake,
    call), in milliseconds."""
    times = []
    for i in range(samples):
        start = time.perf_counter()
        async with aio_channel(target, tls) as channel:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(request(i, task_id),
                                                                     timeout=60)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


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
    with CoordinatorSubprocess() as plain, CoordinatorSubprocess(tls=True) as secured:
        task_ids = []
        for coord in (plain, secured):
            with AdminClient(coord.target, tls=coord.client_tls) as admin:
                task_ids.append(admin.create_task(spec).task_id)
        rates: tuple[list[float], list[float]] = ([], [])
        for _ in range(args.repeats):
            for coord, task_id, out in zip((plain, secured), task_ids, rates, strict=True):
                out.append(asyncio.run(ours(coord.target, task_id, args.devices,
                                            args.calls_per_device, args.channels,
                                            coord.client_tls)))
        first_ms = [asyncio.run(first_call_ms(coord.target, task_id, coord.client_tls))
                    for coord, task_id in zip((plain, secured), task_ids, strict=True)]
    task_id = task_ids[0]
    size = request(0, task_id).ByteSize()
    with BareServer() as server:
        bare_rates = [asyncio.run(bare(server.target, size, args.devices,
                                       args.calls_per_device, args.channels))
                      for _ in range(args.repeats)]
    ours_rate, tls_rate = statistics.median(rates[0]), statistics.median(rates[1])
    bare_rate = statistics.median(bare_rates)
    print(json.dumps({
        "benchmark": "checkin",
        "devices": args.devices,
        "calls": args.devices * args.calls_per_device,
        "channels": args.channels,
        "checkins_per_s": round(ours_rate, 1),
        "checkins_per_s_tls": round(tls_rate, 1),
        "bare_grpc_aio_unary_per_s": round(bare_rate, 1),
        "ratio_to_bare": round(ours_rate / bare_rate, 3),
        "tls_ratio": round(tls_rate / ours_rate, 3),
        "first_call_ms": round(first_ms[0], 2),
        "first_call_ms_tls": round(first_ms[1], 2),
        "request_bytes": size,
        "target_ratio": 0.5,
        "tls_target_ratio": 0.6,
    }))


if __name__ == "__main__":
    main()
