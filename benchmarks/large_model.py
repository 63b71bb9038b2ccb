"""A large model through one real coordinator: a ``--model-params`` float32 model (default
100M parameters, 400 MB per update) and ``--devices`` devices (e.g. ``2,4,8``; a fresh
``fedctl coordinator serve`` for each count, real gRPC port, real SQLite file) that check in,
download the model, and each upload a synthetic update of the model's size (1 MiB chunks, as
the agent sends them) at the same time; the round folds them and commits a new version.
Prints one JSON line with, per device count: the coordinator's peak RSS (the kernel's
high-water mark) and peak PSS (sampled from ``/proc/PID/smaps_rollup``), its RSS once the task
was created (model loaded and written), the round's wall time, download and upload
throughput, the commit time, and the check-in latency of ``--probes`` small devices that check
in every ``--probe-interval-s`` while the big ones upload and the round aggregates.

Memory must not grow with the number of devices: an update is spooled to disk chunk by chunk
and folded into one float64 accumulator, so the peak should be the same for 2, 4 and 8.

The model is an MLP ``h -> h -> 10`` (``h*h + 11h + 10`` parameters, ``h`` the largest width
within ``--model-params``; 10,000 for 100M: a logistic regression's input is capped at 2^20):
the coordinator's cost depends only on the parameter count. Devices do no
training (the update is ``N(0, 1e-4)`` values, the same for every device). Probes start once
every big device is seated (so that selection never draws a probe); their check-ins are
answered "retry later" and are timed by phase: ``committing`` (from the round's release,
its recorded end, to its commit ``commit_seconds`` later: the last folds, the release, the
server optimizer step and the model file, off the event loop), ``uploading`` (else from the
first upload's start to the last upload's answer: chunks are hashed and spooled on the event
loop and folded on the aggregation worker) and ``idle`` (the rest: downloads, and after the
commit); ``task_creation``: probes of another task id while the admin call creates the task
(the model is built, checked and written). ``round_wall_s``: the round's start to its commit.

    python benchmarks/large_model.py --devices 2,4,8
    python benchmarks/large_model.py --devices 2 --model-params 10000000   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
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
)
from core.types import API_VERSION, ModelSpec, TaskSpec  # noqa: E402
from protos.fedcoord.v1 import common_pb2, device_pb2, device_pb2_grpc  # noqa: E402

ATTRIBUTES = common_pb2.DeviceAttributes(charging=True, unmetered=True, idle=True,
                                         population="default")
Outcome = device_pb2.CheckInResponse
#: Largest gRPC message a device sends or takes (a 1 MiB chunk and its framing).
MESSAGE_LIMIT = 8 << 20
MIB = 1 << 20


# ---------------------------------------------------------------------- coordinator memory


def status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM) in bytes; 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def pss_bytes(pid: int) -> int:
    """The process's proportional set size (``/proc/PID/smaps_rollup``); 0 if unreadable."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0




class MemorySampler(threading.Thread):
    """RSS and PSS of ``pid`` every ``interval_s`` (unix s, rss, pss)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), status_bytes(self.pid, "VmRSS"),
                                 pss_bytes(self.pid)))
            self.done.wait(self.interval_s)

    def peak(self, start: float = 0.0, end: float = float("inf"), column: int = 1) -> int:
        values = [int(s[column]) for s in self.samples if start <= s[0] <= end]
        return int(max(values, default=0))


# ---------------------------------------------------------------------- devices


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        ("grpc.max_send_message_length", MESSAGE_LIMIT)])


class SyntheticUpdate:
    """One update for every device: ``params`` float32 values, its sha256, sent in chunks
    made as the stream asks for them (the sender holds the update once, not per device)."""

    def __init__(self, params: int) -> None:
        rng = np.random.default_rng(0)
        values = rng.standard_normal(params, dtype=np.float32)
        values *= np.float32(1e-4)
        self.data = memoryview(values.astype("<f4", copy=False).tobytes())
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    async def messages(self, header: device_pb2.UploadUpdateRequest,
                       chunk_bytes: int) -> AsyncIterator[device_pb2.UploadUpdateRequest]:
        yield header
        for start in range(0, len(self.data), chunk_bytes):
            yield device_pb2.UploadUpdateRequest(chunk=bytes(self.data[start:start + chunk_bytes]))


async def big_device(target: str, task_id: str, device_id: str, update: SyntheticUpdate,
                     seated: asyncio.Event, seats: list[str], devices: int
                     ) -> dict[str, Any]:
    """Checks in until seated, downloads the model, uploads the update; its timings."""
    async with channel(target) as ch:
        stub = device_pb2_grpc.DeviceServiceStub(ch)
        request = device_pb2.CheckInRequest(api_version=API_VERSION, device_id=device_id,
                                            task_id=task_id, attributes=ATTRIBUTES)
        while True:
            resp = await stub.CheckIn(request, timeout=120)
            if resp.outcome == Outcome.ACCEPTED:
                break
            if resp.outcome in (Outcome.FINISHED, Outcome.NO_TASK):
                return {"device": device_id, "error": Outcome.Outcome.Name(resp.outcome)}
            await asyncio.sleep(max(resp.retry_after_ms, 100) / 1000)
        seats.append(device_id)
        if len(seats) == devices:
            seated.set()
        p = device_pb2.Participation(device_id=device_id, task_id=resp.task_id,
                                     round_number=resp.round_number,
                                     token=resp.participation_token)
        out: dict[str, Any] = {"device": device_id}
        try:
            plan = await stub.GetPlan(device_pb2.GetPlanRequest(api_version=API_VERSION,
                                                                participation=p), timeout=120)
            out["download_start"] = time.time()
            downloaded = 0
            async for msg in stub.DownloadModel(device_pb2.DownloadModelRequest(
                    api_version=API_VERSION, participation=p), timeout=900):
                downloaded += len(msg.chunk)
            out["download_end"] = time.time()
            out["downloaded_bytes"] = downloaded
            total = len(update.data)
            header = device_pb2.UploadUpdateRequest(header=device_pb2.UpdateHeader(
                api_version=API_VERSION, participation=p, num_examples=100,
                tensors=plan.update_tensors, total_bytes=total, sha256=update.sha256,
                upload_id=os.urandom(12).hex()))
            out["upload_start"] = time.time()
            await stub.UploadUpdate(update.messages(header, int(plan.max_chunk_bytes)),
                                    timeout=900)
            out["upload_end"] = time.time()
            out["uploaded_bytes"] = total
        except grpc.aio.AioRpcError as exc:
            out["error"] = f"{exc.code().name}: {(exc.details() or '')[:200]}"
        return out


async def probe_main(target: str, task_id: str, probes: int, interval_s: float,
                     out: Path) -> None:
    """Small devices checking in every ``interval_s`` until SIGTERM; writes (sent unix s,
    latency ms, outcome) rows to ``out``."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    rows: list[tuple[float, float, str]] = []

    async def probe(i: int) -> None:
        async with channel(target) as ch:
            stub = device_pb2_grpc.DeviceServiceStub(ch)
            request = device_pb2.CheckInRequest(
                api_version=API_VERSION, device_id=f"probe-{i:02d}", task_id=task_id,
                attributes=ATTRIBUTES)
            await asyncio.sleep(interval_s * i / probes)
            while not stop.is_set():
                sent = time.time()
                start = time.perf_counter()
                try:
                    resp = await stub.CheckIn(request, timeout=60)
                    outcome = Outcome.Outcome.Name(resp.outcome)
                except grpc.aio.AioRpcError as exc:
                    outcome = f"error {exc.code().name}"
                rows.append((sent, (time.perf_counter() - start) * 1000, outcome))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)

    await asyncio.gather(*(probe(i) for i in range(probes)))
    out.write_text(json.dumps(rows))


# ---------------------------------------------------------------------- one run


def mlp_width(params: int) -> int:
    """The width ``h`` of a square MLP (``h`` inputs, one hidden layer of ``h``, 10 classes)
    whose ``h*h + 11h + 10`` parameters are closest to ``params`` from below (at least 1)."""
    h = max(1, int(math.isqrt(params)))
    while h > 1 and mlp_params(h) > params:
        h -= 1
    return h


def mlp_params(h: int) -> int:
    return h * h + h + h * 10 + 10


def task_spec(params: int, devices: int, deadline_s: float) -> TaskSpec:
    h = mlp_width(params)
    return TaskSpec(
        name="bench-large-model",
        model=ModelSpec("mlp", {"input_dim": h, "hidden": [h], "num_classes": 10}),
        rounds=1, clients_per_round=devices, min_reports=devices, over_selection=1.0,
        round_deadline_s=deadline_s, selection_window_s=2.0)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"n": len(values), "p50": round(float(p50), 1), "p99": round(float(p99), 1),
            "max": round(float(max(values)), 1)}


def one_run(args: argparse.Namespace, devices: int, update: SyntheticUpdate) -> dict[str, Any]:
    spec = task_spec(args.model_params, devices, args.deadline_s)
    params = mlp_params(spec.model.arguments["input_dim"])
    load_before = [round(x, 2) for x in os.getloadavg()]
    with CoordinatorSubprocess(device_auth=False) as coord:
        assert coord.proc is not None
        pid = coord.proc.pid
        sampler = MemorySampler(pid, args.sample_s)
        sampler.start()
        rss_started = status_bytes(pid, "VmRSS")
        creation_out = Path(coord.dir) / "probes-creation.json"
        # Probes of a task that does not exist while the task is created (NOT_FOUND answers):
        # what creating a large model's task costs every other call.
        creation_prober = subprocess.Popen(
            [sys.executable, __file__, "--probe", "--target", coord.target,
             "--task-id", "no-such-task", "--probes", str(args.probes),
             "--probe-interval-s", str(args.probe_interval_s), "--out", str(creation_out)],
            env=ENV)
        time.sleep(3.0)  # the probes connect and answer before the task is created
        created = time.time()
        with coord.admin() as admin:
            admin.timeout_s = 600.0
            task_id = admin.create_task(spec).task_id
        create_s = time.time() - created
        creation_prober.send_signal(signal.SIGTERM)
        creation_prober.wait(timeout=60)
        creation_rows = [row for row in json.loads(creation_out.read_text())
                         if created <= row[0] <= created + create_s]
        time.sleep(1.0)
        rss_task = status_bytes(pid, "VmRSS")
        hwm_task = status_bytes(pid, "VmHWM")
        with tempfile.TemporaryDirectory(prefix="fedcoord-large-") as tmp:
            probe_out = Path(tmp) / "probes.json"

            async def devices_main() -> tuple[list[dict[str, Any]], subprocess.Popen[bytes]]:
                seated = asyncio.Event()
                seats: list[str] = []
                tasks = [asyncio.create_task(big_device(
                    coord.target, task_id, f"big-{i:02d}", update, seated, seats, devices))
                    for i in range(devices)]
                await seated.wait()
                prober = subprocess.Popen(
                    [sys.executable, __file__, "--probe", "--target", coord.target,
                     "--task-id", task_id, "--probes", str(args.probes),
                     "--probe-interval-s", str(args.probe_interval_s),
                     "--out", str(probe_out)], env=ENV)
                return list(await asyncio.gather(*tasks)), prober

            cpu_start = cpu_seconds(pid)
            started = time.time()
            results, prober = asyncio.run(devices_main())
            state = ""
            with coord.admin() as admin:
                deadline = time.time() + args.deadline_s
                while time.time() < deadline:
                    state = admin.get_task(task_id).state
                    if state != "running":
                        break
                    time.sleep(0.5)
                rounds = admin.list_rounds(task_id)
            time.sleep(1.0)  # probes after the commit: the idle floor
            prober.send_signal(signal.SIGTERM)
            prober.wait(timeout=60)
            probe_rows = json.loads(probe_out.read_text()) if probe_out.exists() else []
        ended = time.time()
        cpu_s = cpu_seconds(pid) - cpu_start
        sampler.done.set()
        sampler.join()
        peak_rss = status_bytes(pid, "VmHWM")
    result = summarize(args, devices, params, task_id, state, rounds, results, probe_rows,
                       sampler, peak_rss, rss_started, rss_task, hwm_task, create_s, cpu_s,
                       started, ended, load_before)
    result["checkin_ms"]["task_creation"] = percentiles([row[1] for row in creation_rows])
    return result


def summarize(args: argparse.Namespace, devices: int, params: int, task_id: str, state: str,
              rounds: list[Any], results: list[dict[str, Any]], probe_rows: list[Any],
              sampler: MemorySampler, peak_rss: int, rss_started: int, rss_task: int,
              hwm_task: int, create_s: float, cpu_s: float, started: float, ended: float,
              load_before: list[float]) -> dict[str, Any]:
    ok = [r for r in results if "upload_end" in r]
    committed = [r for r in rounds if r.state == "committed"]
    round_start = committed[0].started_unix_ms / 1000 if committed else started
    round_end = committed[0].ended_unix_ms / 1000 if committed else ended
    up_start = min((r["upload_start"] for r in ok), default=round_end)
    up_end = max((r["upload_end"] for r in ok), default=round_end)
    dl = [r for r in results if "download_end" in r]
    dl_start = min((r["download_start"] for r in dl), default=round_end)
    dl_end = max((r["download_end"] for r in dl), default=round_end)
    # A round's recorded end is its release (the last upload accepted); the commit is
    # recorded commit_seconds later.
    commit_s = committed[0].metrics.get("commit_seconds", 0.0) if committed else 0.0
    commit_start, commit_end = round_end, round_end + commit_s
    phases: dict[str, list[float]] = {"idle": [], "uploading": [], "committing": []}
    outcomes: dict[str, int] = {}
    for sent, latency, outcome in probe_rows:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        phase = ("committing" if commit_start <= sent <= commit_end
                 else "uploading" if up_start <= sent <= up_end else "idle")
        phases[phase].append(latency)
    mb = len(ok) and ok[0]["uploaded_bytes"] / 1e6

    def rate(total_mb: float, seconds: float) -> float:
        return round(total_mb / seconds, 1) if seconds > 0 else float("nan")

    return {
        "devices": devices,
        "task_state": state,
        "rounds_committed": len(committed),
        "round_failures": [r.failure_reason[:200] for r in rounds if r.state == "failed"],
        "device_errors": [r["error"] for r in results if "error" in r],
        "update_mb": round(mb, 1),
        "coordinator_peak_rss_mib": round(peak_rss / MIB, 1),
        "coordinator_peak_pss_mib_sampled": round(sampler.peak(column=2) / MIB, 1),
        "coordinator_rss_mib_started": round(rss_started / MIB, 1),
        "coordinator_rss_mib_task_created": round(rss_task / MIB, 1),
        "coordinator_peak_rss_mib_task_creation": round(hwm_task / MIB, 1),
        "coordinator_peak_rss_mib_sampled": {
            "downloads": round(sampler.peak(dl_start, dl_end) / MIB, 1),
            "uploads": round(sampler.peak(up_start, commit_start) / MIB, 1),
            "commit": round(sampler.peak(commit_start, commit_end + 0.5) / MIB, 1),
        },
        "task_create_s": round(create_s, 2),
        "round_wall_s": round(commit_end - round_start, 2),
        "round_to_release_s": round(round_end - round_start, 2),
        "download_s": round(dl_end - dl_start, 2),
        "download_mb_per_s_total": rate(sum(r["downloaded_bytes"] for r in dl) / 1e6,
                                        dl_end - dl_start),
        "upload_s": round(up_end - up_start, 2),
        "upload_mb_per_s_total": rate(mb * len(ok), up_end - up_start),
        "upload_mb_per_s_per_device": [rate(mb, r["upload_end"] - r["upload_start"])
                                       for r in ok],
        "commit_seconds": [round(r.metrics.get("commit_seconds", float("nan")), 3)
                           for r in committed],
        "coordinator_cpu_s": round(cpu_s, 1),
        "checkin_ms": {name: percentiles(v) for name, v in phases.items()},
        "probe_outcomes": outcomes,
        "load_avg_1_5_15_before": load_before,
        "task_id": task_id,
    }


def git_tree() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="2,4,8",
                        help="comma-separated device counts, one coordinator each")
    parser.add_argument("--model-params", type=int, default=100_000_000)
    parser.add_argument("--probes", type=int, default=3, help="small devices checking in")
    parser.add_argument("--probe-interval-s", type=float, default=0.1)
    parser.add_argument("--deadline-s", type=float, default=900.0, help="round deadline")
    parser.add_argument("--sample-s", type=float, default=0.1,
                        help="RSS/PSS sampling interval")
    parser.add_argument("--note", default="", help="added to the JSON line as 'note'")
    # The probe process (started by the run).
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--task-id", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        asyncio.run(probe_main(args.target, args.task_id, args.probes, args.probe_interval_s,
                               Path(args.out)))
        return
    counts = [int(x) for x in args.devices.split(",")]
    if not counts or min(counts) < 1:
        raise SystemExit("--devices: positive counts, e.g. 2,4,8")
    params = mlp_params(mlp_width(args.model_params))
    update = SyntheticUpdate(params)
    started = time.time()
    runs = [one_run(args, n, update) for n in counts]
    result: dict[str, Any] = {
        "benchmark": "large_model",
        "model_params": params,
        "update_mib": round(params * 4 / MIB, 1),
        "runs": runs,
        "peak_rss_mib_by_devices": {r["devices"]: r["coordinator_peak_rss_mib"] for r in runs},
        "limits": LIFTED_LIMITS_NOTE + "; devices unauthenticated (--no-device-auth)",
        "wall_s": round(time.time() - started, 1),
        "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "tree": git_tree(),
    }
    if args.note:
        result["note"] = args.note
    print(json.dumps(result))


if __name__ == "__main__":
    main()
