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
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from benchmarks._common import (  # noqa: E402
    LIFTED_LIMITS_NOTE,
    BareServer,
    CoordinatorSubprocess,
    cpu_seconds,
    machine_load,
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


# --- Observability modes (issue 15): shared with round_overhead.py -----------------------

#: ``--observability`` columns, in their order within a repeat (reversed every other repeat).
OBS_MODES = {
    "nosinks": "no HTTP port, no Kafka sink, and the always-on event sinks (SQL event store, "
               "Prometheus counters) removed from the hub before the start (benchmark-only)",
    "off": "as deployed without observability settings: no HTTP port, no Kafka sink (the SQL "
           "event store and Prometheus sinks are always on)",
    "on": "HTTP side port with /metrics scraped once a second, and a Kafka sink to a local "
          "broker (scripts/kafka.sh), besides the always-on sinks",
    "metrics": "'on' without the Kafka sink (its share of the overhead)",
    "kafka": "'on' without the HTTP port (its share of the overhead)",
}
#: The modes ``--observability both`` runs unless ``--modes`` says otherwise.
DEFAULT_MODES = "nosinks,off,on"

#: Runs ``fedctl`` (argv[3:]) with two benchmark-only patches of Coordinator: ``nosinks``
#: (argv[2]) empties the event hub's sink list before the start; after the start the HTTP port
#: goes to DIR/http_port, and after the stop every sink's counters go to DIR/sinks.json.
SERVE_WRAPPER = r"""
import json, sys
from pathlib import Path
from coordinator import app
from fedctl.main import main

out, mode = Path(sys.argv[1]), sys.argv[2]
_start, _stop = app.Coordinator.start, app.Coordinator.stop

async def start(self):
    if mode == "nosinks":
        self.events._sinks.clear()
    port = await _start(self)
    (out / "http_port").write_text(str(self.http_port))
    return port

async def stop(self, grace=2.0):
    await _stop(self, grace)
    sinks = {"hub_sink_failures": self.events.sink_failures}
    for sink in self.events._sinks:
        names = ("queued", "sent", "dropped", "failed", "write_failures", "events_lost")
        sinks[type(sink).__name__] = {n: getattr(sink, n) for n in names
                                      if isinstance(getattr(sink, n, None), int)}
    (out / "sinks.json").write_text(json.dumps(sinks))

app.Coordinator.start, app.Coordinator.stop = start, stop
sys.exit(main(sys.argv[3:]))
"""


class KafkaBroker:
    """A local Kafka-protocol broker for the run (scripts/kafka.sh start/clean)."""

    SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kafka.sh"

    def __init__(self, storage: str = "memory") -> None:
        #: ``memory`` (the default here): the broker keeps its log in its own memory, with no
        #: S3 store process beside it on this machine's cores; ``s3``: as the tests run it.
        self.storage = storage

    def __enter__(self) -> KafkaBroker:
        self.tmp = tempfile.TemporaryDirectory(prefix="fedcoord-bench-kafka-")
        self.dir = Path(self.tmp.name) / "node"
        done = subprocess.run(["bash", str(self.SCRIPT), "start", str(self.dir)],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "FEDCOORD_KAFKA_STORAGE": self.storage})
        if done.returncode != 0:
            raise RuntimeError(f"scripts/kafka.sh start failed:\n{done.stderr[-2000:]}")
        self.address = done.stdout.strip()
        return self

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time the broker and its log's store (moto's S3 server) have used so far."""
        used = {"broker": 0.0, "store": 0.0}
        for name in used:
            with contextlib.suppress(OSError, ValueError):
                used[name] = cpu_seconds(int((self.dir / f"{name}.pid").read_text()))
        return used

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["bash", str(self.SCRIPT), "clean", str(self.dir)], timeout=60,
                       check=False, capture_output=True)
        self.tmp.cleanup()


class Scraper:
    """Fetches ``url`` once a second on a thread of its own, as Prometheus would."""

    def __init__(self, url: str, interval_s: float = 1.0) -> None:
        self.url = url
        self.interval_s = interval_s
        self.scrapes = 0
        self.errors = 0
        self.bytes = 0
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-scraper")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    self.bytes += len(response.read())
                self.scrapes += 1
                self.seconds.append(time.perf_counter() - start)
            except OSError:
                self.errors += 1

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def summary(self) -> dict[str, float]:
        return {"scrapes": self.scrapes, "errors": self.errors,
                "median_ms": round(statistics.median(self.seconds) * 1000, 2)
                if self.seconds else 0.0,
                "max_ms": round(max(self.seconds) * 1000, 2) if self.seconds else 0.0,
                "bytes_last": self.bytes // max(1, self.scrapes)}


class ObservedCoordinator(CoordinatorSubprocess):
    """A :class:`CoordinatorSubprocess` in one of :data:`OBS_MODES` (``on`` needs the
    broker's address). :attr:`sinks` holds the event sinks' counters once it has stopped;
    in ``on`` mode a :class:`Scraper` reads its /metrics for as long as it runs."""

    def __init__(self, mode: str, kafka: str = "", topic: str = "bench-events",
                 **kwargs: bool) -> None:
        super().__init__(**kwargs)
        assert mode in OBS_MODES and (mode not in ("on", "kafka") or kafka)
        self.mode = mode
        self.sinks: dict[str, object] = {}
        self.scraper: Scraper | None = None
        if mode in ("on", "metrics"):
            self._args += ["--http-port", "0"]
        if mode in ("on", "kafka"):
            self._args += ["--events", f"kafka://{kafka}/{topic}"]

    def _launcher(self) -> list[str]:
        return [sys.executable, "-c", SERVE_WRAPPER, str(self.dir), self.mode]

    def __enter__(self) -> ObservedCoordinator:
        super().__enter__()
        if self.mode in ("on", "metrics"):
            http_port = int((self.dir / "http_port").read_text())
            self.scraper = Scraper(f"http://127.0.0.1:{http_port}/metrics").__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.scraper is not None:
            self.scraper.__exit__()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        with contextlib.suppress(OSError, ValueError):
            self.sinks = json.loads((self.dir / "sinks.json").read_text())
        self.proc = None
        super().__exit__(*exc)


def kafka_totals(coords: list[ObservedCoordinator]) -> dict[str, int]:
    """The Kafka sinks' counters summed over ``coords`` (the ``on`` runs), plus the hub's
    and the event store's failure counts."""
    total = {"queued": 0, "sent": 0, "dropped": 0, "failed": 0, "hub_sink_failures": 0,
             "store_events_lost": 0}
    for c in coords:
        kafka = c.sinks.get("KafkaSink", {})
        store = c.sinks.get("StoreSink", {})
        assert isinstance(kafka, dict) and isinstance(store, dict)
        for name in ("queued", "sent", "dropped", "failed"):
            total[name] += int(kafka.get(name, 0))
        total["hub_sink_failures"] += int(str(c.sinks.get("hub_sink_failures", 0)))
        total["store_events_lost"] += int(store.get("events_lost", 0))
    return total


def add_broker_and_mode_args(parser: argparse.ArgumentParser) -> None:
    """``--broker-storage`` and ``--modes``, as both observability benchmarks take them."""
    parser.add_argument("--broker-storage", choices=["memory", "s3"], default="memory",
                        help="where the local broker keeps its log (memory: no store process "
                             "on the machine's cores; s3: moto's S3 server, as the tests run it)")
    parser.add_argument("--modes", default=DEFAULT_MODES,
                        help="with --observability both: comma-separated modes of OBS_MODES "
                             f"(off and on among them; default {DEFAULT_MODES})")


def parse_modes(text: str) -> list[str]:
    """``--modes``: comma-separated names of :data:`OBS_MODES`, ``off`` and ``on`` among them."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(OBS_MODES))
    if unknown or "off" not in modes or "on" not in modes or len(set(modes)) != len(modes):
        raise SystemExit(f"--modes {text!r}: distinct names of {', '.join(OBS_MODES)}, "
                         "with off and on among them")
    return modes


def mode_order(repeat: int, modes: list[str]) -> list[str]:
    """The modes of repeat ``repeat``: as given, reversed every other repeat (ABBA)."""
    return modes if repeat % 2 == 0 else modes[::-1]


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}






def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--calls-per-device", type=int, default=5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes per coordinator, alternating; medians reported")
    parser.add_argument("--observability", choices=["off", "on", "both"], default="off",
                        help="off: the four coordinators as deployed without observability "
                             "settings (the default); on: the same with /metrics scraped and "
                             "a Kafka sink; both: one coordinator per mode of OBS_MODES "
                             "(nosinks, off, on) of --variant, their passes interleaved")
    parser.add_argument("--variant", choices=[v.name for v in VARIANTS], default="plaintext",
                        help="with --observability both: the variant the modes run")
    add_broker_and_mode_args(parser)
    args = parser.parse_args()
    spec = TaskSpec(name="bench-checkin",
                    model=ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10}),
                    rounds=1, clients_per_round=100, min_reports=100, over_selection=1.0,
                    round_deadline_s=3600, selection_window_s=3000)
    if args.observability == "both":
        main_both(args, spec)
        return
    load_before = machine_load()
    rates: dict[str, list[float]] = {v.name: [] for v in VARIANTS}
    sign_s: list[float] = []
    enroll_rates: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if args.observability == "on":
            broker = stack.enter_context(KafkaBroker(args.broker_storage))
            coords: list[CoordinatorSubprocess] = [
                ObservedCoordinator("on", broker.address, tls=v.tls, device_auth=v.device_auth)
                for v in VARIANTS]
        else:
            coords = [CoordinatorSubprocess(tls=v.tls, device_auth=v.device_auth)
                      for v in VARIANTS]
        sides = [Side(v, stack.enter_context(c)) for v, c in zip(VARIANTS, coords, strict=True)]
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
        "observability": args.observability,
        "observability_mode": OBS_MODES[args.observability],
        **({"kafka": kafka_totals([c for c in coords if isinstance(c, ObservedCoordinator)]),
            "scrapes": [c.scraper.summary() for c in coords
                        if isinstance(c, ObservedCoordinator) and c.scraper is not None]}
           if args.observability == "on" else {}),
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": machine_load(),
    }))


def main_both(args: argparse.Namespace, spec: TaskSpec) -> None:
    """``--observability both``: one coordinator of ``--variant`` per mode, their timed passes
    interleaved (nosinks, off, on, then on, off, nosinks, ...: ``--modes``); one JSON line."""
    variant = next(v for v in VARIANTS if v.name == args.variant)
    modes = parse_modes(args.modes)
    load_before = machine_load()
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_ms: dict[str, list[float]] = {m: [] for m in modes}
    order: list[str] = []
    with contextlib.ExitStack() as stack:
        # The broker is stopped after the coordinators.
        broker = stack.enter_context(KafkaBroker(args.broker_storage))
        coords = {m: ObservedCoordinator(m, broker.address, tls=variant.tls,
                                         device_auth=variant.device_auth) for m in modes}
        sides = {m: Side(variant, stack.enter_context(c)) for m, c in coords.items()}
        for side in sides.values():
            with side.coord.admin() as admin:
                side.task_id = admin.create_task(spec).task_id
            if variant.device_auth:
                asyncio.run(enroll(side, args.devices, args.channels))
        broker_cpu_before = broker.cpu_seconds()
        for r in range(args.repeats):
            for m in mode_order(r, modes):
                proc = sides[m].coord.proc
                assert proc is not None
                cpu_before = cpu_seconds(proc.pid)
                rate, _ = asyncio.run(ours(sides[m], args.devices, args.calls_per_device,
                                           args.channels))
                # Per call of the pass, its warm-up call per device included.
                calls = args.devices * (args.calls_per_device + 1)
                cpu_ms[m].append((cpu_seconds(proc.pid) - cpu_before) * 1000 / calls)
                rates[m].append(rate)
                order.append(m)
        broker_cpu = {k: round(v - broker_cpu_before[k], 2)
                      for k, v in broker.cpu_seconds().items()}
        scrapes = {m: c.scraper.summary() for m, c in coords.items() if c.scraper is not None}
    kafka = kafka_totals([coords["on"]])
    kafka_only = kafka_totals([coords["kafka"]]) if "kafka" in coords else None
    with BareServer() as server:
        size = sides["off"].request(0).ByteSize()
        bare_rates = [asyncio.run(bare(server.target, size, args.devices,
                                       args.calls_per_device, args.channels))
                      for _ in range(args.repeats)]
    median = {m: statistics.median(rs) for m, rs in rates.items()}
    cpu_median = {m: statistics.median(v) for m, v in cpu_ms.items()}
    on_ratio = median["on"] / median["off"]
    print(json.dumps({
        "benchmark": "checkin",
        "observability": "both",
        "variant": variant.name,
        "variant_description": variant.description,
        "modes": OBS_MODES,
        "devices": args.devices,
        "calls": args.devices * args.calls_per_device,
        "channels": args.channels,
        "repeats": args.repeats,
        "order": order,
        "checkins_per_s": {m: spread(rs, 1) for m, rs in rates.items()},
        "checkins_per_s_runs": {m: [round(r, 1) for r in rs] for m, rs in rates.items()},
        "on_off_ratio": round(on_ratio, 3),
        "overhead_on_vs_off": round(1 - on_ratio, 3),
        # Fewer check-ins per second than off, per mode (negative: more).
        "overhead_vs_off": {m: round(1 - median[m] / median["off"], 3) for m in modes},
        "coordinator_cpu_ms_per_call": {m: spread(v, 4) for m, v in cpu_ms.items()},
        "cpu_overhead_on_vs_off": round(cpu_median["on"] / cpu_median["off"] - 1, 3),
        # More coordinator CPU per call than off, per mode.
        "cpu_overhead_vs_off": {m: round(cpu_median[m] / cpu_median["off"] - 1, 3)
                                for m in modes},
        "broker_cpu_s_all_passes": broker_cpu,
        "target_overhead": 0.05,
        "within_target": 1 - on_ratio <= 0.05,
        "cpu_within_target": cpu_median["on"] / cpu_median["off"] - 1 <= 0.05,
        "kafka": kafka,
        "kafka_all_sent": (kafka["sent"] == kafka["queued"] and kafka["dropped"] == 0
                           and kafka["failed"] == 0 and kafka["queued"] > 0),
        **({"kafka_mode_kafka": kafka_only} if kafka_only is not None else {}),
        "scrapes": scrapes,
        "bare_grpc_aio_unary_per_s": round(statistics.median(bare_rates), 1),
        "limits": LIFTED_LIMITS_NOTE,
        "broker_storage": args.broker_storage,
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": machine_load(),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
