"""1,000 virtual devices checking in concurrently: check-ins per second against a bare
grpc.aio unary call of the same request size, over four coordinators in the same run.
Prints one JSON line.

The coordinators (columns) are:

- ``plaintext``: no TLS, ``--no-device-auth``: the pre-security baseline, unsigned check-ins;
- ``tls``: TLS, ``--no-device-auth``;
- ``auth``: no TLS, device authentication: every device enrolled its Ed25519 key beforehand
  and every check-in carries a fresh proof (its own nonce, so a new signature per call);
- ``secured``: TLS and device authentication, as a deployment serves.

They run side by side and their repeats alternate, so all see the same machine; ratios are
to ``plaintext``. Devices share a few long-lived channels, as an agent process's devices share
one: the TLS handshake is paid once per channel (in the warm-up pass) and amortized;
``first_call_ms`` reports what one fresh channel's first call costs on each.

Signing is the device's work, on its own CPU: the benchmark signs every proof before the
pass that sends it (the warm-up's, then the timed pass's), so the rates are the coordinator's
and the transport's; ``client_sign_us_per_checkin`` is what building one signed request cost
this client. A pass must end within the coordinator's proof window (60 s) of its signing.

The benchmark sends every device's check-ins from one address, so the coordinator's per-address
and per-device limits are raised (``limits`` in the output) and never refuse a call.

    python benchmarks/checkin.py [--devices 1000] [--calls-per-device 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from benchmarks._common import (  # noqa: E402
    LIFTED_LIMITS_NOTE,
    BareServer,
    CoordinatorSubprocess,
)
from core.security.identity import DeviceKey  # noqa: E402
from core.tls import ClientTls  # noqa: E402
from core.types import API_VERSION, ModelSpec, TaskSpec  # noqa: E402
from protos import convert  # noqa: E402
from protos.fedcoord.v1 import common_pb2, device_pb2, device_pb2_grpc  # noqa: E402

ATTRIBUTES = common_pb2.DeviceAttributes(charging=True, unmetered=True, idle=True,
                                         population="default")


@dataclass(frozen=True)
class Variant:
    name: str
    tls: bool
    device_auth: bool
    description: str


VARIANTS = (
    Variant("plaintext", False, False, "no TLS, --no-device-auth (unsigned check-ins)"),
    Variant("tls", True, False, "TLS, --no-device-auth"),
    Variant("auth", False, True, "no TLS, enrolled keys, every check-in signed"),
    Variant("secured", True, True, "TLS, enrolled keys, every check-in signed"),
)


@dataclass
class Side:
    """One coordinator of the run, its task and (with device authentication) its devices'
    keys."""

    variant: Variant
    coord: CoordinatorSubprocess
    task_id: str = ""
    keys: list[DeviceKey] = field(default_factory=list)

    def request(self, i: int) -> device_pb2.CheckInRequest:
        """Device ``i``'s next check-in: signed with a fresh proof under device
        authentication, else the unsigned request of the pre-security protocol."""
        if not self.variant.device_auth:
            return device_pb2.CheckInRequest(
                api_version=API_VERSION, device_id=f"bench-device-{i:06d}",
                task_id=self.task_id, attributes=ATTRIBUTES)
        key = self.keys[i % len(self.keys)]
        return device_pb2.CheckInRequest(
            api_version=API_VERSION, device_id=key.device_id, task_id=self.task_id,
            attributes=ATTRIBUTES,
            proof=convert.device_proof_to_proto(key.prove("check-in", self.task_id)))

    def requests(self, devices: int, per_device: int) -> tuple[list[list[device_pb2.CheckInRequest]], float]:
        """``per_device`` requests for each device, and the seconds building them took."""
        start = time.perf_counter()
        if self.variant.device_auth:
            reqs = [[self.request(i) for _ in range(per_device)] for i in range(devices)]
        else:  # nothing to sign: one request object per device, sent again and again
            reqs = [[self.request(i)] * per_device for i in range(devices)]
        return reqs, time.perf_counter() - start


async def drive(call: Callable[[int, int], Awaitable[None]], devices: int,
                per_device: int) -> float:
    """Runs devices x per_device calls with `devices` concurrent callers; returns calls/s."""
    async def device(i: int) -> None:
        for k in range(per_device):
            await call(i, k)

    start = time.perf_counter()
    await asyncio.gather(*(device(i) for i in range(devices)))
    return devices * per_device / (time.perf_counter() - start)


def aio_channel(target: str, tls: ClientTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(tls.ca_pem))


async def enroll(side: Side, devices: int, channels: int) -> float:
    """Generates and enrolls ``devices`` keys concurrently; returns enrollments/s."""
    side.keys = [DeviceKey.generate() for _ in range(devices)]
    chans = [aio_channel(side.coord.target, side.coord.client_tls) for _ in range(channels)]
    stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in chans]
    reqs = [device_pb2.EnrollRequest(api_version=API_VERSION,
                                     proof=convert.device_proof_to_proto(key.prove("enroll")))
            for key in side.keys]

    async def call(i: int, _: int) -> None:
        resp = await stubs[i % channels].Enroll(reqs[i], timeout=60)
        assert resp.device_id == side.keys[i].device_id

    rate = await drive(call, devices, 1)
    for c in chans:
        await c.close()
    return rate


async def ours(side: Side, devices: int, per_device: int, channels: int
               ) -> tuple[float, float]:
    """Check-ins/s of the timed pass, and the seconds per request its signing took."""
    chans = [aio_channel(side.coord.target, side.coord.client_tls) for _ in range(channels)]
    stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in chans]
    reqs: list[list[device_pb2.CheckInRequest]] = []

    async def call(i: int, k: int) -> None:
        resp = await stubs[i % channels].CheckIn(reqs[i][k], timeout=60)
        assert resp.outcome != device_pb2.CheckInResponse.OUTCOME_UNSPECIFIED

    reqs, _ = side.requests(devices, 1)
    await drive(call, devices, 1)  # warm-up: every channel connected, every device known
    reqs, sign_s = side.requests(devices, per_device)
    rate = await drive(call, devices, per_device)
    for c in chans:
        await c.close()
    return rate, sign_s / (devices * per_device)


async def first_call_ms(side: Side, samples: int = 20) -> float:
    """Median time from a new channel to its first check-in's answer (connect, handshake,
    call), in milliseconds; the request is built (signed) before the clock starts."""
    times = []
    for i in range(samples):
        req = side.request(i)
        start = time.perf_counter()
        async with aio_channel(side.coord.target, side.coord.client_tls) as channel:
            await device_pb2_grpc.DeviceServiceStub(channel).CheckIn(req, timeout=60)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def bare(target: str, size: int, devices: int, per_device: int, channels: int) -> float:
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    calls = [c.unary_unary("/bare.Bare/Unary") for c in chans]
    payload = bytes(size)

    async def call(i: int, _: int) -> None:
        await calls[i % channels](payload, timeout=60)

    await drive(call, devices, 1)
    rate = await drive(call, devices, per_device)
    for c in chans:
        await c.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--calls-per-device", type=int, default=5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per coordinator, alternating; medians reported")
    args = parser.parse_args()
    spec = TaskSpec(name="bench-checkin",
                    model=ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10}),
                    rounds=1, clients_per_round=100, min_reports=100, over_selection=1.0,
                    round_deadline_s=3600, selection_window_s=3000)
    rates: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    sign_s: list[float] = []
    enroll_rates: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        sides = [Side(v, stack.enter_context(CoordinatorSubprocess(tls=v.tls,
                                                                   device_auth=v.device_auth)))
                 for v in VARIANTS]
        for side in sides:
            with side.coord.admin() as admin:
                side.task_id = admin.create_task(spec).task_id
            if side.variant.device_auth:
                enroll_rates[side.variant.name] = asyncio.run(
                    enroll(side, args.devices, args.channels))
        for _ in range(args.repeats):
            for side in sides:
                rate, per_request_s = asyncio.run(ours(side, args.devices,
                                                       args.calls_per_device, args.channels))
                rates[side.variant.name].append(rate)
                if side.variant.name == "secured":
                    sign_s.append(per_request_s)
        first_ms = {side.variant.name: asyncio.run(first_call_ms(side)) for side in sides}
    sizes = {side.variant.name: side.request(0).ByteSize() for side in sides}
    with BareServer() as server:
        bare_rates = [asyncio.run(bare(server.target, sizes["plaintext"], args.devices,
                                       args.calls_per_device, args.channels))
                      for _ in range(args.repeats)]
    median = {name: statistics.median(runs) for name, runs in rates.items()}
    plain = median["plaintext"]
    bare_rate = statistics.median(bare_rates)
    print(json.dumps({
        "benchmark": "checkin",
        "devices": args.devices,
        "calls": args.devices * args.calls_per_device,
        "channels": args.channels,
        "repeats": args.repeats,
        "columns": {v.name: v.description for v in VARIANTS},
        "checkins_per_s": round(plain, 1),
        "checkins_per_s_tls": round(median["tls"], 1),
        "checkins_per_s_auth": round(median["auth"], 1),
        "checkins_per_s_secured": round(median["secured"], 1),
        "checkins_per_s_runs": {name: [round(r, 1) for r in runs]
                                for name, runs in rates.items()},
        "bare_grpc_aio_unary_per_s": round(bare_rate, 1),
        "ratio_to_bare": round(plain / bare_rate, 3),
        "tls_ratio": round(median["tls"] / plain, 3),
        "auth_ratio": round(median["auth"] / plain, 3),
        "secured_ratio": round(median["secured"] / plain, 3),
        "first_call_ms": round(first_ms["plaintext"], 2),
        "first_call_ms_tls": round(first_ms["tls"], 2),
        "first_call_ms_auth": round(first_ms["auth"], 2),
        "first_call_ms_secured": round(first_ms["secured"], 2),
        "client_sign_us_per_checkin": round(statistics.median(sign_s) * 1e6, 1),
        "proofs": "signed before each pass (one fresh proof per check-in), outside the timing",
        "enrollments_per_s": {name: round(r, 1) for name, r in enroll_rates.items()},
        "request_bytes": sizes["plaintext"],
        "request_bytes_secured": sizes["secured"],
        "limits": LIFTED_LIMITS_NOTE,
        "target_ratio": 0.5,
        "secured_target_ratio": 0.6,
    }))


if __name__ == "__main__":
    main()
