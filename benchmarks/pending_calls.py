"""What a flood of calls costs a coordinator's memory: ``--calls`` concurrent CheckIn calls,
each carrying ``--payload-bytes`` of padding (an unknown protobuf field, under the check-in's
64 KiB request limit), sent at once over ``--channels`` connections to a real
``fedctl coordinator serve`` with its default security (device authentication on, so every
call is refused UNAUTHENTICATED: the cheapest answer it has). The event loop answers a few
thousand calls a second, so most of the flood waits in gRPC's queue of calls the application
has not taken (``grpc.server.max_pending_requests``, 16,384: calls past it are cancelled).

Prints one JSON line: the coordinator's RSS before, its peak (VmHWM) and the highest RSS
sampled during the flood, the calls' outcomes by status, and how long the flood took to be
answered.

    python benchmarks/pending_calls.py [--calls 16384] [--payload-bytes 60000] [--channels 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from benchmarks._common import CoordinatorSubprocess, machine_load  # noqa: E402
from core.types import API_VERSION  # noqa: E402
from protos.fedcoord.v1 import device_pb2  # noqa: E402

METHOD = "/fedcoord.v1.DeviceService/CheckIn"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def padded_request(payload_bytes: int) -> bytes:
    """A CheckInRequest with ``payload_bytes`` of an unknown length-delimited field (99)."""
    body = device_pb2.CheckInRequest(api_version=API_VERSION, device_id="flood").SerializeToString()
    tag = (99 << 3) | 2
    length, n = bytearray(), payload_bytes
    while True:
        byte = n & 0x7F
        n >>= 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return body + bytes([tag & 0x7F | 0x80, tag >> 7]) + bytes(length) + bytes(payload_bytes)


async def flood(target: str, calls: int, payload: bytes, channels: int) -> tuple[Counter[str],
                                                                                float]:
    conns = [grpc.aio.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 1 << 20)]) for _ in range(channels)]
    stubs = [c.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
             for c in conns]
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        try:
            await stubs[i % channels](payload, timeout=120)
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed = time.monotonic() - started
    for c in conns:
        await c.close()
    return outcomes, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1 << 14)
    parser.add_argument("--payload-bytes", type=int, default=60_000)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    load_before = machine_load()
    with CoordinatorSubprocess(lift_limits=False) as coord:
        assert coord.proc is not None
        pid = coord.proc.pid
        time.sleep(2.0)  # settled after start-up
        before = rss_kib(pid)
        highest = before
        done = threading.Event()

        def sample() -> None:
            nonlocal highest
            while not done.wait(0.02):
                highest = max(highest, rss_kib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        outcomes, elapsed = asyncio.run(flood(coord.target, args.calls,
                                              padded_request(args.payload_bytes),
                                              args.channels))
        done.set()
        sampler.join()
        time.sleep(1.0)
        after = rss_kib(pid)
        peak = rss_kib(pid, "VmHWM")
    sent_mib = args.calls * args.payload_bytes / 2**20
    print(json.dumps({
        "benchmark": "pending_calls", "calls": args.calls, "payload_bytes": args.payload_bytes,
        "channels": args.channels, "sent_mib": round(sent_mib, 1),
        "coordinator_rss_mib_before": round(before / 1024, 1),
        "coordinator_rss_mib_highest_sampled": round(highest / 1024, 1),
        "coordinator_peak_rss_mib": round(peak / 1024, 1),
        "coordinator_rss_mib_after": round(after / 1024, 1),
        "held_mib_per_1000_calls": round((highest - before) / 1024 / (args.calls / 1000), 2),
        "outcomes": dict(outcomes), "answered_in_s": round(elapsed, 2),
        "security": "defaults: device authentication on, default rate limits",
        "load_avg_1_5_15_before": load_before, "load_avg_1_5_15_after": machine_load(),
        "cpus": os.cpu_count(), **({"note": args.note} if args.note else {})}))


if __name__ == "__main__":
    main()
