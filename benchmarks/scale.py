"""Many devices on one coordinator: ``--devices`` virtual devices in ``--workers`` load
generator processes check in to a real ``fedctl coordinator serve`` (real gRPC port, real
SQLite file), a cohort of ``--per-round`` x over-selection is drawn each round, and the
selected devices download the model and upload an update of the model's size. Prints one JSON
line: devices that got an answer, check-ins/s, p50/p99 check-in latency (all, while a round
aggregates, and outside), round wall times, the coordinator's peak RSS and its CPU seconds per
round.

The load generator is not ``fedctl agent run --devices N``: the agent runs a thread, a data
shard and a torch trainer per device, which 2,500 per process on this 2-core machine cannot
carry (and which measures training, not the coordinator). Each virtual device here speaks
the device protocol over gRPC as the agent does (CheckIn, GetPlan, DownloadModel,
UploadUpdate with a header, 1 MiB chunks, the sha256 and an upload id), waits the
coordinator's ``retry_after_ms`` within the agent's bounds (0.05-60 s), backs off failed
calls as the agent does, and "trains" by sleeping ``--train-s``; its update is
precomputed (small random values, the same for every device of a worker). Check-ins share
``--channels`` connections per worker; a selected device opens one of its own for its plan,
download and upload (as a real device has its own), so a large transfer never queues other
devices' check-ins behind it on a shared connection. The coordinator
path is the real one; devices are unauthenticated (``--no-device-auth``: enrolling 10,000
keys measures enrollment, which benchmarks/checkin.py covers) and every device calls from
127.0.0.1, so the per-address limits are lifted (``limits`` in the output).

"While a round aggregates" is, per round, from its first upload's start to the round's end
(FedAvg folds each update in as it arrives; then the release and the commit). Latencies of
check-ins sent in those windows are ``checkin_ms_aggregating``, the others
``checkin_ms_idle``. ``--model-params 10000000`` with a small ``--per-round`` measures what
aggregating a 10M-parameter model (40 MB per update) does to the check-ins around it.

``--aggregators K`` starts K ``fedctl aggregator serve`` shards and the coordinator with
them: the selected devices upload to the shard their plan names (with its ticket), and the
line adds each shard's peak RSS and CPU seconds; the coordinator's figures are then what is
left for it to do (check-ins, plans, downloads, the polls and the combination).

    python benchmarks/scale.py --devices 10000 --per-round 1000 [--workers 4] [--rounds 3]
    python benchmarks/scale.py --devices 2000 --per-round 20 --model-params 10000000
    python benchmarks/scale.py --devices 5000 --per-round 500 --aggregators 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    ENV,
    LIFTED_LIMITS_NOTE,
    CoordinatorSubprocess,
    cpu_seconds,
    machine_load,
)
from coordinator.rounds.aggregators import PlainAggregator  # noqa: E402
from coordinator.settings import CoordinatorSettings  # noqa: E402
from core.shards import derive_shard_key  # noqa: E402
from core.types import API_VERSION, ModelSpec, TaskSpec  # noqa: E402
from fedctl.aggregator import write_new_key  # noqa: E402
from protos.fedcoord.v1 import (  # noqa: E402
    aggregator_pb2_grpc,
    common_pb2,
    device_pb2,
    device_pb2_grpc,
)

ATTRIBUTES = common_pb2.DeviceAttributes(charging=True, unmetered=True, idle=True,
                                         population="default")
Outcome = device_pb2.CheckInResponse
#: Largest gRPC message either side sends (a 1 MiB chunk and its header).
MESSAGE_LIMIT = 8 << 20
#: The device agent's bounds on a "come back after" (device_agent.runtime.device MIN_WAIT_S
#: and MAX_WAIT_S): a virtual device waits as long as a real one would, no less, no more.
MIN_WAIT_S, MAX_WAIT_S = 0.05, 60.0
#: device_agent.runtime.device.REPORTED_WAIT_S: how long a device whose update went to a shard
#: waits when the coordinator offers it that seat again (before its next poll of the shard).
REPORTED_WAIT_S = 1.0


# ---------------------------------------------------------------------- load generator


class Worker:
    """One load generator process: ``devices`` virtual devices on ``channels`` channels."""

    def __init__(self, target: str, task_id: str, worker: int, devices: int, channels: int,
                 ramp_s: float, train_s: tuple[float, float]) -> None:
        self.target = target
        self.task_id = task_id
        self.worker = worker
        self.devices = devices
        self.ramp_s = ramp_s
        self.train_s = train_s
        self.channel_count = channels
        self.channels: list[grpc.aio.Channel] = []
        self.stubs: list[device_pb2_grpc.DeviceServiceStub] = []
        self.rng = random.Random(worker)
        self.stop: asyncio.Event | None = None
        # Per check-in: when it was sent (unix s) and its latency (ms).
        self.sent: list[float] = []
        self.latency_ms: list[float] = []
        # Per upload: round number, start and end (unix s), accepted (1) or not (0).
        self.uploads: list[tuple[int, float, float, int]] = []
        self.answered: set[int] = set()
        self.last_answer: dict[int, float] = {}
        self.errors: Counter[str] = Counter()
        self.error_details: dict[str, str] = {}
        #: How long each failed check-in took to fail (ms).
        self.failed_after_ms: list[float] = []
        #: Every "come back after" a check-in was told (ms).
        self.retry_after_ms: list[int] = []
        self.outcomes: Counter[str] = Counter()
        self.downloaded_bytes = 0
        self._update: tuple[list[device_pb2.UploadUpdateRequest], str, int] | None = None

    def update_for(self, plan: device_pb2.GetPlanResponse) -> tuple[
            list[device_pb2.UploadUpdateRequest], str, int]:
        """The precomputed update of the plan's tensors: its chunk messages, sha256, bytes."""
        if self._update is None:
            size = sum(int(np.prod(t.shape)) for t in plan.update_tensors)
            values = np.random.default_rng(self.worker).normal(0, 1e-4, size).astype("<f4")
            data = values.tobytes()
            step = int(plan.max_chunk_bytes)
            chunks = [device_pb2.UploadUpdateRequest(chunk=data[i:i + step])
                      for i in range(0, len(data), step)]
            self._update = (chunks, hashlib.sha256(data).hexdigest(), len(data))
        return self._update

    async def device(self, i: int) -> None:
        device_id = f"scale-w{self.worker}-{i:05d}"
        stub = self.stubs[i % len(self.stubs)]
        request = device_pb2.CheckInRequest(api_version=API_VERSION, device_id=device_id,
                                            task_id=self.task_id, attributes=ATTRIBUTES)
        await asyncio.sleep(self.rng.uniform(0, self.ramp_s))
        assert self.stop is not None
        failures = 0
        reported = ""  # the token of this device's last accepted upload
        while not self.stop.is_set():
            sent = time.time()
            start = time.perf_counter()
            try:
                resp = await stub.CheckIn(request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                self.error(f"CheckIn {exc.code().name}", exc)
                self.failed_after_ms.append((time.perf_counter() - start) * 1000)
                # The agent's backoff (RetryPolicy: full jitter, 0.2 s doubling to 10 s).
                await asyncio.sleep(self.rng.uniform(0, min(10.0, 0.2 * 2 ** failures)))
                failures += 1
                continue
            failures = 0
            self.sent.append(sent)
            self.latency_ms.append((time.perf_counter() - start) * 1000)
            self.answered.add(i)
            self.last_answer[i] = sent
            self.outcomes[Outcome.Outcome.Name(resp.outcome)] += 1
            if resp.outcome == Outcome.FINISHED:
                return
            if resp.outcome == Outcome.ACCEPTED and resp.participation_token == reported:
                # As the agent (REPORTED_WAIT_S): the seat its update already went to, at
                # a shard the coordinator has not polled since.
                await asyncio.sleep(REPORTED_WAIT_S)
                continue
            if resp.outcome == Outcome.ACCEPTED:
                # A device has a connection of its own: its 40 MB transfers never hold up
                # other devices' check-ins on a shared one.
                async with self.channel() as own:
                    if await self.participate(device_pb2_grpc.DeviceServiceStub(own),
                                              device_id, resp):
                        reported = resp.participation_token
                continue
            self.retry_after_ms.append(resp.retry_after_ms)
            await asyncio.sleep(min(max(resp.retry_after_ms / 1000, MIN_WAIT_S), MAX_WAIT_S))

    def error(self, kind: str, exc: grpc.aio.AioRpcError) -> None:
        self.errors[kind] += 1
        self.error_details.setdefault(kind, (exc.details() or "")[:200])

    async def participate(self, stub: device_pb2_grpc.DeviceServiceStub, device_id: str,
                          resp: device_pb2.CheckInResponse) -> bool:
        """Plan, download, "train", upload; True when the update was accepted."""
        p = device_pb2.Participation(device_id=device_id, task_id=resp.task_id,
                                     round_number=resp.round_number,
                                     token=resp.participation_token)
        try:
            plan = await stub.GetPlan(device_pb2.GetPlanRequest(api_version=API_VERSION,
                                                                participation=p), timeout=60)
            async for msg in stub.DownloadModel(device_pb2.DownloadModelRequest(
                    api_version=API_VERSION, participation=p), timeout=300):
                self.downloaded_bytes += len(msg.chunk)
        except grpc.aio.AioRpcError as exc:
            self.error(f"plan/download {exc.code().name}", exc)
            return False
        await asyncio.sleep(self.rng.uniform(*self.train_s))
        chunks, sha256, total = self.update_for(plan)
        sharded = plan.HasField("shard_upload")
        header = device_pb2.UploadUpdateRequest(header=device_pb2.UpdateHeader(
            api_version=API_VERSION, participation=p, num_examples=100,
            tensors=plan.update_tensors, total_bytes=total, sha256=sha256,
            upload_id=secrets.token_urlsafe(16),
            ticket=plan.shard_upload.ticket if sharded else None))

        async def messages() -> Any:
            yield header
            for chunk in chunks:
                yield chunk

        start = time.time()
        try:
            if sharded:  # to the shard the plan names, on a connection of its own
                async with self.channel(plan.shard_upload.address) as to_shard:
                    await aggregator_pb2_grpc.AggregatorServiceStub(to_shard).UploadUpdate(
                        messages(), timeout=300)
            else:
                await stub.UploadUpdate(messages(), timeout=300)
            ok = 1
        except grpc.aio.AioRpcError as exc:
            self.error(f"UploadUpdate {exc.code().name}", exc)
            ok = 0
        self.uploads.append((int(resp.round_number), start, time.time(), ok))
        return bool(ok)

    def channel(self, target: str | None = None) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target or self.target, options=[
            ("grpc.max_receive_message_length", MESSAGE_LIMIT),
            ("grpc.max_send_message_length", MESSAGE_LIMIT)])

    async def run(self, out: Path) -> None:
        self.channels = [self.channel() for _ in range(self.channel_count)]
        self.stubs = [device_pb2_grpc.DeviceServiceStub(c) for c in self.channels]
        self.stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.stop.set)
        tasks = [asyncio.create_task(self.device(i)) for i in range(self.devices)]
        everything: asyncio.Future[Any] = asyncio.gather(*tasks)
        stopper: asyncio.Future[Any] = asyncio.create_task(self.stop.wait())
        await asyncio.wait([everything, stopper], return_when=asyncio.FIRST_COMPLETED)
        everything.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await everything
        for c in self.channels:
            await c.close(None)
        np.savez(out, sent=np.array(self.sent), latency_ms=np.array(self.latency_ms),
                 failed_after_ms=np.array(self.failed_after_ms),
                 retry_after_ms=np.array(self.retry_after_ms, dtype=np.float64),
                 uploads=np.array(self.uploads, dtype=np.float64).reshape(-1, 4),
                 last_answer=np.array(list(self.last_answer.values())))
        out.with_suffix(".json").write_text(json.dumps({
            "answered": len(self.answered), "errors": dict(self.errors),
            "error_details": self.error_details, "cpu_s": time.process_time(),
            "outcomes": dict(self.outcomes), "downloaded_bytes": self.downloaded_bytes}))


def worker_main(args: argparse.Namespace) -> None:
    lo, hi = (float(x) for x in args.train_s.split(","))
    worker = Worker(args.target, args.task_id, args.worker, args.worker_devices,
                    args.channels, args.ramp_s, (lo, hi))
    asyncio.run(worker.run(Path(args.out)))


# ---------------------------------------------------------------------- the run


class Sampler(threading.Thread):
    """The coordinator's CPU seconds and RSS every ``interval_s``."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, int]] = []  # unix s, cpu s, rss bytes
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), cpu_seconds(self.pid), rss_bytes(self.pid)))
            self.done.wait(self.interval_s)

    def cpu_between(self, start: float, end: float) -> float:
        def at(t: float) -> float:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]
        return at(end) - at(start)






def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    p50, p99, p999 = np.percentile(values, [50, 99, 99.9])
    return {"n": int(values.size), "p50": round(float(p50), 2), "p99": round(float(p99), 2),
            "p99_9": round(float(p999), 2), "max": round(float(values.max()), 2)}


def fold_costs_ms(params: int, repeats: int = 3) -> dict[str, float]:
    """What one update's fold into FedAvg's aggregate and one release cost, in this process
    (median ms of ``repeats``): the work the aggregation worker takes off the event loop."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "update"
        np.random.default_rng(0).normal(0, 1e-4, params).astype("<f4").tofile(path)
        aggregator = PlainAggregator(params, weight_cap=10_000)
        folds, releases = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            aggregator.add_upload(path, 100, {})
            folds.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            aggregator.release(None)
            releases.append((time.perf_counter() - start) * 1000)
    return {"fold_ms": round(statistics.median(folds), 1),
            "release_ms": round(statistics.median(releases), 1)}


#: What the event loop's samples in a profile were doing: (name, a frame that marks it), the
#: first match counts.
LOOP_WORK = (
    ("fold: PlainAggregator.add_upload", "PlainAggregator.add_upload"),
    ("release: PlainAggregator.release", "PlainAggregator.release"),
    ("late admission: RoundMachine.admit", "RoundMachine.admit"),
    ("upload chunk write+sha256: SpooledUpload.write", "SpooledUpload.write"),
    ("model download chunks: ModelRepository.chunks", "ModelRepository.chunks"),
    ("other SQLite commits and executes", "DefaultDialect.do_commit"),
    ("other SQLite commits and executes", "DefaultDialect.do_execute"),
    ("group commit flush: DeferredParticipantWrites.flush", "DeferredParticipantWrites.flush"),
    ("check-in events: EventHub.emit", "EventHub.emit"),
    ("check-in (other than late admission)", "CoordinatorService.check_in"),
)


def loop_work(profile: Path, rate_hz: float = 50.0) -> dict[str, float]:
    """Seconds of the coordinator's main thread (its event loop) in a py-spy raw profile
    (``--profile``), in total and by :data:`LOOP_WORK`."""
    total = 0
    seconds: Counter[str] = Counter()
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        total += int(count)
        for name, marker in LOOP_WORK:
            if any(marker in f for f in frames):
                seconds[name] += int(count)
                break
    return {"main_thread_s": round(total / rate_hz, 1),
            **{name: round(n / rate_hz, 1) for name, n in seconds.most_common()}}


def task_spec(args: argparse.Namespace) -> TaskSpec:
    # logistic regression, 10 classes: (input_dim + 1) x 10 parameters.
    input_dim = max(1, args.model_params // 10 - 1)
    return TaskSpec(
        name="bench-scale",
        model=ModelSpec("logistic_regression", {"input_dim": input_dim, "num_classes": 10}),
        rounds=args.rounds, clients_per_round=args.per_round,
        min_reports=max(1, int(args.per_round * 0.8)), over_selection=args.over_selection,
        round_deadline_s=args.deadline_s, selection_window_s=args.window_s)


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = task_spec(args)
    load_before = machine_load()
    out_dir = Path(tempfile.mkdtemp(prefix="fedcoord-scale-"))
    coordinator = CoordinatorSubprocess(device_auth=False)
    if args.retry_after_max is not None:
        coordinator._args += ["--retry-after-max", str(args.retry_after_max)]
    shards = start_shards(args.aggregators, out_dir)
    for address in (s.address for s in shards):
        coordinator._args += ["--aggregator", address]
    if shards:
        coordinator._args += ["--shard-key-file", str(out_dir / "shard.key")]
    shard_samplers = [Sampler(s.proc.pid) for s in shards]
    for sampler in shard_samplers:
        sampler.start()
    try:
        result = _run_with(args, spec, coordinator, out_dir, load_before)
    finally:
        for sampler in shard_samplers:
            sampler.done.set()
            sampler.join()
        shard_rss = [rss_bytes(s.proc.pid, "VmHWM") for s in shards]
        for s in shards:
            s.proc.send_signal(signal.SIGTERM)
        for s in shards:
            s.proc.wait(timeout=60)
    result["aggregators"] = len(shards)
    result["aggregator_peak_rss_mib"] = [round(r / 2**20, 1) for r in shard_rss]
    result["aggregator_cpu_s_total"] = [
        round(sm.samples[-1][1] - sm.samples[0][1], 2) if sm.samples else None
        for sm in shard_samplers]
    return result


class _Shard:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.address = f"127.0.0.1:{port}"


def start_shards(count: int, out_dir: Path) -> list[_Shard]:
    """``count`` aggregator shards on free ports, with a new key in ``out_dir``."""
    if count == 0:
        return []
    master = secrets.token_bytes(32)
    write_new_key(out_dir / "shard.key", master)
    shards = []
    for i in range(count):
        port_file = out_dir / f"aggregator-{i}.port"
        key = out_dir / f"aggregator-{i}.key"  # the shard's own key, derived from the master
        write_new_key(key, derive_shard_key(master, i))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedctl", "aggregator", "serve", "--index", str(i),
             "--key-file", str(key), "--port", "0", "--port-file", str(port_file),
             "--spool-dir", str(out_dir / f"spool-{i}")],
            stdout=open(out_dir / f"aggregator-{i}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, env=ENV)
        deadline = time.monotonic() + 120
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((out_dir / f"aggregator-{i}.log").read_text())
            time.sleep(0.05)
        shards.append(_Shard(proc, int(port_file.read_text())))
    return shards


def _run_with(args: argparse.Namespace, spec: TaskSpec, coordinator: CoordinatorSubprocess,
              out_dir: Path, load_before: list[float]) -> dict[str, Any]:
    with coordinator as coord:
        assert coord.proc is not None
        with coord.admin() as admin:
            task_id = admin.create_task(spec).task_id
        sampler = Sampler(coord.proc.pid)
        sampler.start()
        profiler = None
        if args.profile:  # py-spy's collapsed stacks of the coordinator, all threads
            profiler = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                 str(coord.proc.pid), "--format", "raw", "--rate", "50", "--threads",
                 "--output", args.profile], stdout=subprocess.DEVNULL)
        per_worker = [args.devices // args.workers + (w < args.devices % args.workers)
                      for w in range(args.workers)]
        started = time.time()
        workers = [subprocess.Popen(
            [sys.executable, __file__, "--worker", str(w), "--target", coord.target,
             "--task-id", task_id, "--worker-devices", str(n), "--channels", str(args.channels),
             "--ramp-s", str(args.ramp_s), "--train-s", args.train_s,
             "--out", str(out_dir / f"worker-{w}.npz")], env=ENV)
            for w, n in enumerate(per_worker)]
        deadline = started + args.timeout_s
        state = ""
        with coord.admin() as admin:
            while time.time() < deadline and all(w.poll() is None for w in workers):
                state = admin.get_task(task_id).state
                if state != "running":
                    break
                time.sleep(3.0)  # an admin call costs the loop too
            state = admin.get_task(task_id).state
            rounds = admin.list_rounds(task_id)
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=120)
        ended = time.time()
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        sampler.done.set()
        sampler.join()
        peak_rss = rss_bytes(coord.proc.pid, "VmHWM")
    return summarize(args, spec, task_id, state, rounds, sampler, peak_rss, out_dir,
                     started, ended, load_before)


def summarize(args: argparse.Namespace, spec: TaskSpec, task_id: str, state: str,
              rounds: list[Any], sampler: Sampler, peak_rss: int, out_dir: Path,
              started: float, ended: float, load_before: list[float]) -> dict[str, Any]:
    parts = [np.load(p) for p in sorted(out_dir.glob("worker-*.npz"))]
    infos = [json.loads(p.read_text()) for p in sorted(out_dir.glob("worker-*.json"))]
    sent = np.concatenate([p["sent"] for p in parts])
    latency = np.concatenate([p["latency_ms"] for p in parts])
    uploads = np.concatenate([p["uploads"] for p in parts])
    committed = [r for r in rounds if r.state == "committed"]
    windows = []  # (start, end) per round: first upload's start to the round's end
    for r in rounds:
        if not r.ended_unix_ms:
            continue
        mine = uploads[uploads[:, 0] == r.round_number] if uploads.size else uploads
        first = float(mine[:, 1].min()) if mine.size else r.ended_unix_ms / 1000
        windows.append((first, r.ended_unix_ms / 1000))
    in_agg = np.zeros(sent.shape, dtype=bool)
    by_round = []  # each round's own window: the first one also holds the devices' ramp
    for a, b in windows:
        in_agg |= (sent >= a) & (sent <= b)
        by_round.append(percentiles(latency[(sent >= a) & (sent <= b)]))
    if committed:
        first_start = min(r.started_unix_ms for r in committed) / 1000
        last_end = max(r.ended_unix_ms for r in committed) / 1000
        cpu_per_round = sampler.cpu_between(first_start, last_end) / len(committed)
        in_rounds = (sent >= first_start) & (sent <= last_end)
        rate = float(in_rounds.sum() / (last_end - first_start))
        last = max(committed, key=lambda r: r.ended_unix_ms)
        active_last_round = int(sum(
            ((p["last_answer"] >= last.started_unix_ms / 1000)).sum() for p in parts))
    else:
        cpu_per_round, rate, active_last_round = float("nan"), float("nan"), 0
    # Devices answered within the agent's longest wait before the end: the ones still
    # checking in then, however far apart their check-ins are paced.
    active_at_end = int(sum((p["last_answer"] >= ended - MAX_WAIT_S).sum() for p in parts))
    errors: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    details: dict[str, str] = {}
    for info in infos:
        errors.update(info["errors"])
        outcomes.update(info["outcomes"])
        for kind, text in info["error_details"].items():
            details.setdefault(kind, text)
    accepted_uploads = int(uploads[:, 3].sum()) if uploads.size else 0
    return {
        "benchmark": "scale",
        "devices": args.devices,
        "workers": args.workers,
        "per_round": args.per_round,
        "over_selection": args.over_selection,
        "selection_target": spec.selection_target,
        "model_params": (spec.model.arguments["input_dim"] + 1) * 10,
        "in_process": fold_costs_ms((spec.model.arguments["input_dim"] + 1) * 10),
        "rounds_asked": args.rounds,
        "task_state": state,
        "rounds_committed": len(committed),
        "round_attempts_failed": [r.failure_reason[:160] for r in rounds
                                  if r.state == "failed"],
        "connected_devices": sum(i["answered"] for i in infos),
        "devices_answered_in_last_round": active_last_round,
        "devices_answered_in_last_60s": active_at_end,
        "checkins": int(sent.size),
        "checkins_per_s_during_rounds": round(rate, 1),
        "checkin_ms": percentiles(latency),
        "checkin_ms_aggregating": percentiles(latency[in_agg]),
        "checkin_ms_aggregating_by_round": by_round,
        "checkin_ms_idle": percentiles(latency[~in_agg]),
        "round_wall_s": [round((r.ended_unix_ms - r.started_unix_ms) / 1000, 2)
                         for r in committed],
        "round_reports": [r.reports for r in committed],
        "round_selected": [r.selected for r in committed],
        "commit_seconds": [round(r.metrics.get("commit_seconds", float("nan")), 3)
                           for r in committed],
        "uploads": int(uploads.shape[0]), "uploads_accepted": accepted_uploads,
        "coordinator_peak_rss_mib": round(peak_rss / 2**20, 1),
        "coordinator_cpu_s_per_round": round(cpu_per_round, 2),
        "coordinator_cpu_s_total": round(sampler.samples[-1][1] - sampler.samples[0][1], 2),
        "wall_s": round(ended - started, 1),
        "outcomes": dict(outcomes),
        "errors": dict(errors),
        "error_examples": details,
        "retry_after_ms": percentiles(np.concatenate(
            [p["retry_after_ms"] for p in parts if "retry_after_ms" in p])),
        "checkin_failed_after_ms": percentiles(
            np.concatenate([p["failed_after_ms"] for p in parts])),
        "load_generator_cpu_s": round(sum(i["cpu_s"] for i in infos), 1),
        "downloaded_mib": round(sum(i["downloaded_bytes"] for i in infos) / 2**20, 1),
        "targets": {"connected_devices": 10_000, "checkin_p99_ms_aggregating": 250,
                    "coordinator_rss_mib": 2048},
        "limits": LIFTED_LIMITS_NOTE + "; devices unauthenticated (--no-device-auth)",
        "load_avg_1_5_15_before": load_before,
        "load_avg_1_5_15_after": machine_load(),
        "cpus": os.cpu_count(),
        "retry_after_max_s": args.retry_after_max or 5.0,
        "checkin_pace_per_s": getattr(CoordinatorSettings(), "checkin_pace_per_s", None),
        "task_id": task_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4,
                        help="load generator processes (the devices are split among them)")
    parser.add_argument("--channels", type=int, default=8, help="gRPC channels per worker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--over-selection", type=float, default=1.3)
    parser.add_argument("--model-params", type=int, default=100_000,
                        help="parameters of the model (a logistic regression); an update is "
                             "4 bytes each")
    parser.add_argument("--window-s", type=float, default=10.0, help="selection window")
    parser.add_argument("--deadline-s", type=float, default=120.0, help="round deadline")
    parser.add_argument("--ramp-s", type=float, default=10.0,
                        help="devices' first check-ins spread over this many seconds")
    parser.add_argument("--train-s", default="2,5",
                        help="LO,HI: a selected device 'trains' for uniform(LO, HI) seconds")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--retry-after-max", type=float, default=None,
                        help="the coordinator's --retry-after-max (longest 'come back after'; "
                             "default: the coordinator's own, 5 s)")
    parser.add_argument("--profile", default="",
                        help="PATH: py-spy record the coordinator (collapsed stacks) into PATH")
    parser.add_argument("--summarize-profile", default="", metavar="PATH",
                        help="print the event loop's seconds by activity of a --profile file "
                             "and exit")
    parser.add_argument("--aggregators", type=int, default=0, metavar="K",
                        help="aggregator shards (fedctl aggregator serve) the uploads go to; "
                             "0: to the coordinator")
    parser.add_argument("--note", default="", help="added to the JSON line as 'note'")
    # A load generator process (started by the run).
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--task-id", help=argparse.SUPPRESS)
    parser.add_argument("--worker-devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker_main(args)
        return
    if args.devices < 1 or args.per_round < 1 or args.workers < 1:
        raise SystemExit("--devices, --per-round and --workers must be at least 1")
    if args.summarize_profile:
        print(json.dumps({"benchmark": "scale-profile", "profile": args.summarize_profile,
                          "event_loop_s": loop_work(Path(args.summarize_profile)),
                          **({"note": args.note} if args.note else {})}))
        return
    result = run(args)
    if args.profile:
        result["event_loop_s"] = loop_work(Path(args.profile))
    if args.note:
        result["note"] = args.note
    print(json.dumps(result))


if __name__ == "__main__":
    main()
