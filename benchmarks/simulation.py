"""Simulation throughput, side by side: devices trained per second by our engine, Flower 1.42's
simulation engine, Apple's pfl 0.6 simulation (``--engines pfl``; skipped with a reason when
pfl is not installed) and a plain sequential torch loop (``core.training.train_local``
device after device), on one workload:

    Synthetic(1,1), 1000 devices (seed 0); 100 devices a round from a fixed seeded schedule
    that every engine trains; 1 local epoch, batch 10, SGD lr 0.01; 20 rounds; FedAvg.
    models: logistic regression 60->10, MLP 60-200-200-10

Every (engine, model) runs in its own child process group with a hard timeout (``--timeout``;
the whole group is killed when it runs out), so memory is measured per engine and a hang
cannot block the benchmark. Prints one JSON line per (engine, model): steady-state devices/s
over rounds 2-R, round 1's seconds apart (start-up: for Flower this includes starting Ray),
peak RSS of the child's whole process tree (psutil, children included, sampled every 50 ms),
final test accuracy and its difference from the sequential loop's, the achieved GFLOP/s
(forward + backward FLOPs per sample x samples/s) against a 2048x2048 float32 matmul on this
machine, and, on our engine's line, its speed-up over each other engine.

    python benchmarks/simulation.py [--engines sequential,flower,pfl,ours] [--models lr,mlp]
                                    [--rounds 20] [--threads 1] [--processes 1]
                                    [--timeout 900]

Engines plug in through :data:`ENGINES`: a function ``(Workload, model key, threads) ->
(Measurement, final accuracy)`` that trains the same schedule (``workload.schedule``, seeds
``workload.seeds``) with the same data (``workload.data``), calls ``measure.start()`` when
its clock should start and ``measure.round_done()`` after each round. A runner that cannot
run here raises :class:`EngineSkipped`; its line then carries ``skipped`` (the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.models import build_model, initial_state, load_numpy_state  # noqa: E402
from core.training import evaluate  # noqa: E402
from core.types import LocalTraining, ModelSpec, ServerOptimizer  # noqa: E402
from simulations.algorithms import FederatedAlgorithm  # noqa: E402
from simulations.cohort import DeviceJob, DeviceTable, LocalObjective, make_trainer  # noqa: E402
from simulations.config import (  # noqa: E402
    AlgorithmConfig,
    DataConfig,
    DataSource,
    EngineKind,
)
from simulations.data import FederatedData, load_federated_data  # noqa: E402
from simulations.engine import device_seed  # noqa: E402

MODELS = {
    "lr": ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10}),
    "mlp": ModelSpec("mlp", {"input_dim": 60, "hidden": [200, 200], "num_classes": 10}),
}
LAYERS = {"lr": [60, 10], "mlp": [60, 200, 200, 10]}
LOCAL = LocalTraining(epochs=1, batch_size=10, learning_rate=0.01)
DEFAULT_ENGINES = "sequential,flower,ours"
DEFAULT_TIMEOUT_S = 900.0


class EngineSkipped(Exception):
    """The engine cannot run here (e.g. its package is not installed); the message says why."""


@dataclass(frozen=True, eq=False)
class Workload:
    data: FederatedData
    schedule: list[list[int]]  # device indices per round
    local: LocalTraining = LOCAL
    seed: int = 0

    @property
    def seeds(self) -> list[list[int]]:
        """Shuffling seed of each scheduled device (``device_seed``), as the schedule."""
        return [[device_seed(self.seed, r, d) for d in devices]
                for r, devices in enumerate(self.schedule, start=1)]


def make_workload(*, devices: int = 1000, per_round: int = 100, rounds: int = 20,
                  seed: int = 0) -> Workload:
    data = load_federated_data(DataConfig(DataSource.SYNTHETIC, num_devices=devices, seed=seed))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C4E]))
    schedule = [sorted(rng.choice(devices, size=per_round, replace=False).tolist())
                for _ in range(rounds)]
    return Workload(data, schedule, seed=seed)


@dataclass
class Measurement:
    """Round end times; peak RSS of this process and its children, sampled in a thread."""

    round_ends: list[float] = field(default_factory=list)
    peak_rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # engine notes for the JSON line
    _start: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        import psutil

        self._start = time.perf_counter()
        me = psutil.Process(os.getpid())

        def sample() -> None:
            while not self._stop.wait(0.05):
                rss = 0
                try:
                    tree = [me, *me.children(recursive=True)]
                except psutil.Error:
                    continue
                for p in tree:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_rss = max(self.peak_rss, rss)

        threading.Thread(target=sample, daemon=True).start()

    def round_done(self) -> None:
        self.round_ends.append(time.perf_counter())

    def stop(self) -> None:
        self._stop.set()

    def summary(self, workload: Workload) -> dict[str, Any]:
        ends = [self._start, *self.round_ends]
        rounds = len(self.round_ends)
        out: dict[str, Any] = {"rounds_done": rounds,
                               "peak_rss_mb": round(self.peak_rss / 2**20, 1), **self.extra}
        if rounds >= 1:
            out["round1_s"] = round(ends[1] - ends[0], 3)
        if rounds >= 2:
            steady = ends[-1] - ends[1]
            sizes = workload.data.sizes()
            devices = sum(len(s) for s in workload.schedule[1:rounds])
            samples = sum(int(sizes[s].sum()) for s in workload.schedule[1:rounds])
            out.update(devices_per_s=round(devices / steady, 1),
                       samples_per_s=round(samples / steady), steady_rounds=rounds - 1,
                       round_s=[round(b - a, 3) for a, b in zip(ends, ends[1:], strict=False)])
        return out


def _final_accuracy(workload: Workload, spec: ModelSpec, params: dict[str, np.ndarray]) -> float:
    model = build_model(spec)
    load_numpy_state(model, params)
    _, accuracy = evaluate(model, workload.data.x_test, workload.data.y_test)
    return accuracy


def _run_in_process(workload: Workload, model: str, kind: EngineKind, threads: int,
                    processes: int = 1) -> tuple[Measurement, float]:
    spec = MODELS[model]
    table = DeviceTable(workload.data)
    if processes > 1:
        from simulations.process_backend import ProcessCohortTrainer

        pool = ProcessCohortTrainer(table, processes, kind=kind, model=spec,
                                    local=workload.local, algorithm=AlgorithmConfig(),
                                    capacity=max(len(s) for s in workload.schedule))
        try:
            return _rounds(workload, spec, pool)
        finally:
            pool.shutdown()
    trainer = make_trainer(kind, spec, table, workload.local, LocalObjective(), threads=threads)
    return _rounds(workload, spec, trainer)


def _rounds(workload: Workload, spec: ModelSpec, trainer: Any) -> tuple[Measurement, float]:
    algorithm = FederatedAlgorithm(AlgorithmConfig(), ServerOptimizer())
    params = initial_state(spec, workload.seed)
    measure = Measurement()
    measure.start()
    for devices, seeds in zip(workload.schedule, workload.seeds, strict=True):
        jobs = [DeviceJob(d, s) for d, s in zip(devices, seeds, strict=True)]
        result = trainer.train({n: torch.from_numpy(v) for n, v in params.items()}, jobs)
        params = algorithm.server_update(params, devices, result)
        measure.round_done()
    measure.stop()
    return measure, _final_accuracy(workload, spec, params)


def ours(workload: Workload, model: str, threads: int) -> tuple[Measurement, float]:
    """Our engine: with ``--processes N`` (N > 1) the cohort is split across N worker
    processes (then ``threads`` is ignored), else ``threads`` lock-step threads in process.
    Flower's simulation runs one Ray worker per core, so ``--processes 2`` on 2 cores is the
    like-for-like setting."""
    return _run_in_process(workload, model, EngineKind.AUTO, threads, PROCESSES)


#: ``--processes`` of our engine (set in the child from its arguments).
PROCESSES = 1


def sequential(workload: Workload, model: str, threads: int) -> tuple[Measurement, float]:
    torch.set_num_threads(1)  # the plain loop: one device at a time, one thread
    return _run_in_process(workload, model, EngineKind.LOOP, 1)


def flower(workload: Workload, model: str, threads: int) -> tuple[Measurement, float]:
    """Flower 1.42 ``run_simulation`` (Ray); see :mod:`benchmarks.flower_simulation`."""
    from benchmarks.flower_simulation import run_flower

    table = DeviceTable(workload.data)
    spec = MODELS[model]
    measure = Measurement()
    params = run_flower(x=table.x.numpy(), y=table.y.numpy(), offsets=table.offsets,
                        schedule=workload.schedule, seeds=workload.seeds, spec=spec,
                        local=workload.local, initial=initial_state(spec, workload.seed),
                        clock=measure)
    return measure, _final_accuracy(workload, spec, params)


def pfl(workload: Workload, model: str, threads: int) -> tuple[Measurement, float]:
    """Apple's pfl 0.6 ``SimulatedBackend`` + ``FederatedAveraging``; see
    :mod:`benchmarks.pfl_simulation`."""
    from benchmarks.pfl_simulation import SCHEDULE, pfl_unavailable, run_pfl

    reason = pfl_unavailable()
    if reason is not None:
        raise EngineSkipped(reason)
    table = DeviceTable(workload.data)
    spec = MODELS[model]
    measure = Measurement()
    measure.extra["schedule"] = SCHEDULE
    params = run_pfl(x=table.x.numpy(), y=table.y.numpy(), offsets=table.offsets,
                     schedule=workload.schedule, seeds=workload.seeds, spec=spec,
                     local=workload.local, initial=initial_state(spec, workload.seed),
                     clock=measure)
    return measure, _final_accuracy(workload, spec, params)


#: Engine name -> runner (see the module docstring for the contract).
ENGINES: dict[str, Callable[[Workload, str, int], tuple[Measurement, float]]] = {
    "sequential": sequential,
    "flower": flower,
    "pfl": pfl,
    "ours": ours,
}


def train_flops_per_sample(model: str) -> int:
    """Forward (2 x in x out per layer) + backward (weight gradient 2 x in x out per layer,
    input gradient for every layer but the first) multiply-add FLOPs of one sample."""
    dims = LAYERS[model]
    macs = [a * b for a, b in zip(dims, dims[1:], strict=False)]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def matmul_gflops(threads: int, size: int = 2048, repeat: int = 8) -> float:
    """torch's float32 ``size x size`` matmul throughput with ``threads`` threads: the
    machine's practical compute ceiling."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(2):
            a @ b
        t0 = time.perf_counter()
        for _ in range(repeat):
            a @ b
        return 2 * size**3 * repeat / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(before)


# -- parent: one child process group per (engine, model) ---------------------------------------


def _run_child(engine: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--engines", engine,
           "--models", model, "--rounds", str(args.rounds), "--threads", str(args.threads),
           "--processes", str(args.processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    log_path = Path(args.log_dir) / f"simulation-{engine}-{model}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=args.timeout)
            error = None if proc.returncode == 0 else f"child exited {proc.returncode}"
        except subprocess.TimeoutExpired:
            out, error = b"", f"timeout after {args.timeout:.0f}s"
        finally:
            _kill_tree(proc)
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith("{"):
            row: dict[str, Any] = json.loads(line)
            return row
    tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
    return {"engine": engine, "model": model, "error": f"{error or 'no result'}; log: {log_path}",
            "log_tail": tail}


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Ends the child's process group and any descendants that left it (Ray's daemons)."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in descendants:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        try:
            proc.wait(timeout=10)
            psutil.wait_procs(descendants, timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _child(args: argparse.Namespace) -> None:
    global PROCESSES
    engine, model = args.engines, args.models
    PROCESSES = args.processes
    workload = make_workload(rounds=args.rounds)
    torch.set_num_threads(args.threads)
    head = {"benchmark": "simulation", "engine": engine, "model": model,
            "devices": workload.data.num_devices,
            "per_round": len(workload.schedule[0]), "rounds": len(workload.schedule),
            "threads": 1 if engine == "sequential" else args.threads,
            **({"processes": args.processes} if engine == "ours" else {})}
    try:
        measure, accuracy = ENGINES[engine](workload, model, args.threads)
    except EngineSkipped as e:
        print(json.dumps({**head, "skipped": str(e)}), flush=True)
        return
    print(json.dumps({**head, **measure.summary(workload),
                      "final_accuracy": round(accuracy, 4)}), flush=True)


def _compare(rows: dict[str, dict[str, Any]], model: str, ceiling: dict[str, float]) -> None:
    base = rows.get("sequential", {}).get("final_accuracy")
    for row in rows.values():
        if "samples_per_s" in row:
            row["gflops"] = round(train_flops_per_sample(model) * row["samples_per_s"] / 1e9, 2)
            row["matmul_gflops"] = ceiling
        if base is not None and "final_accuracy" in row:
            row["accuracy_minus_sequential"] = round(row["final_accuracy"] - base, 4)
            row["accuracy_matches"] = abs(row["final_accuracy"] - base) <= 0.01
    ours_speed = rows.get("ours", {}).get("devices_per_s")
    if ours_speed:
        rows["ours"]["speedup"] = {e: round(ours_speed / r["devices_per_s"], 2)
                                   for e, r in rows.items()
                                   if e != "ours" and r.get("devices_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=DEFAULT_ENGINES,
                        help=f"comma list of {', '.join(ENGINES)}; ours runs last")
    parser.add_argument("--models", default="lr,mlp", help="comma list of lr, mlp")
    parser.add_argument("--rounds", type=int, default=20, help="round 1 is timed apart")
    parser.add_argument("--threads", type=int, default=1,
                        help="worker threads of our engine (torch ops run single-threaded)")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes of our engine (1: in process)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="hard limit in seconds for each (engine, model) child")
    parser.add_argument("--log-dir", default=os.environ.get("TMPDIR", "/tmp"),
                        help="where each child's stderr goes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    engines.sort(key=list(ENGINES).index)  # ours last: its line carries the speed-ups
    ceiling = {f"{t}_threads": round(matmul_gflops(t), 1)
               for t in sorted({1, args.threads})}
    for model in args.models.split(","):
        rows: dict[str, dict[str, Any]] = {}
        for engine in engines:
            rows[engine] = _run_child(engine, model, args)
            _compare(rows, model, ceiling)
            print(json.dumps(rows[engine]), flush=True)


if __name__ == "__main__":
    main()
