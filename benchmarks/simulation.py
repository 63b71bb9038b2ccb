"""Simulation throughput at equal cores: devices trained per second by our engine, Flower
1.42's simulation engine (Ray), Apple's pfl 0.6 simulation and a plain sequential torch loop
(``core.training.train_local`` device after device), on one workload:

    Synthetic(1,1), 1000 devices (seed 0); 100 devices a round from a fixed seeded schedule
    that every engine trains; 1 local epoch, batch 10, SGD lr 0.01; 20 rounds; FedAvg.
    models: logistic regression 60->10 (lr), MLP 60-200-200-10 (mlp, 54k parameters),
    MLP 60-1000-1000-10 (mlp1m, 1.07M parameters)

Rows are grouped by the number of cores (``--cores 1,2``). A group's engines run one after the
other, each in a child process group pinned to the same first ``cores`` CPUs
(``sched_setaffinity``, inherited by everything the engine starts: Ray's daemons and actors,
torchrun's workers, our worker processes), every process with one torch thread, and each
engine trains with ``cores`` worker processes:

* ``ours``: 1 core: in this process (``engine.processes: 1``); N cores: N worker processes
  (``simulations.process_backend``, ``engine.processes: N``).
* ``flower``: ``run_simulation`` with Ray given N CPUs and one CPU per ClientApp, i.e. N actors.
* ``pfl``: 1 core: pfl's ``SimulatedBackend`` in process; N cores: N workers started with
  ``torchrun`` (torch.distributed, gloo), pfl's own distributed simulation, no other
  infrastructure (see :mod:`benchmarks.pfl_simulation`).
* ``sequential``: 1 core only (the reference loop; its accuracy is what the others must match).

``--repeat R`` runs each group R times, the engine order reversed every other time (peers
first, then ours first), so a machine whose load drifts does not favour one side. Each
(engine, model, cores) run has a hard timeout (``--timeout``; the whole group is killed when it
runs out), so memory is measured per engine and a hang cannot block the benchmark.

Prints one JSON line per run: ``engine`` and its version, ``cores`` (CPUs the run was pinned
to), ``processes`` (worker processes that train), steady-state devices/s over rounds 2-R,
round 1's seconds apart (start-up: for Flower this includes starting Ray; ``setup_s``: from
loading the data to the clock's start), each round's CPU seconds of the process tree
(``round_cpu_s``; in-process engines and ours), peak RSS of the run's process tree from the clock's
start (``peak_rss_mb``, psutil, sampled every 50 ms), and from the child's start the tree's
peak PSS (``peak_pss_mb``, /proc/PID/smaps_rollup: shared pages counted once) and summed RSS
(``peak_rss_sum_mb``), final test accuracy and its
difference from the sequential loop's, the achieved GFLOP/s (forward + backward FLOPs per
sample x samples/s) against a single-thread 2048x2048 float32 matmul on this machine, and, on
our engine's line, ``speedup``: its devices/s over each other engine's in the same group
(same cores, same repeat), the only ratios to quote, and ``per_core_vs_sequential``: its
devices/s per core over the plain loop's most recent one-core run of the same model
(``--cores 1,2`` runs that first).

    python benchmarks/simulation.py [--engines sequential,flower,pfl,ours] [--models lr,mlp]
                                    [--cores 1,2] [--repeat 1] [--rounds 20] [--timeout 900]
                                    [--devices 1000] [--per-round 100] [--skip ours:1]
    python benchmarks/simulation.py --floor --models lr,mlp,mlp1m   # one core's ceiling
    python benchmarks/simulation.py --summarize results.jsonl ...   # medians, ranges

Engines plug in through :data:`ENGINES`: a function ``(Workload, model key, cores) ->
(Measurement, final accuracy)`` that trains the same schedule (``workload.schedule``, seeds
``workload.seeds``) with the same data (``workload.data``) on ``cores`` worker processes, calls
``measure.start()`` when its clock should start and ``measure.round_done()`` after each round.
A runner that cannot run here raises :class:`EngineSkipped`; its line then carries ``skipped``
(the reason).
"""

from __future__ import annotations

import argparse
import functools
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
    EngineKind,
)
from simulations.data import FederatedData, load_federated_data  # noqa: E402
from simulations.engine import device_seed  # noqa: E402

MODELS = {
    "lr": ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10}),
    "mlp": ModelSpec("mlp", {"input_dim": 60, "hidden": [200, 200], "num_classes": 10}),
    "mlp1m": ModelSpec("mlp", {"input_dim": 60, "hidden": [1000, 1000], "num_classes": 10}),
}
LAYERS = {"lr": [60, 10], "mlp": [60, 200, 200, 10], "mlp1m": [60, 1000, 1000, 10]}
LOCAL = LocalTraining(epochs=1, batch_size=10, learning_rate=0.01)
DEFAULT_ENGINES = "sequential,flower,pfl,ours"
DEFAULT_TIMEOUT_S = 900.0
#: perf_counter when the child began its workload (setup_s: from here to the clock's start).
_CHILD_STARTED = 0.0


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
    # In shared memory from the start: our worker processes map it (the other engines
    # copy what they need, whatever memory it is in).
    data = load_federated_data(DataConfig(f"synthetic:alpha=1,beta=1,seed={seed}",
                                          num_devices=devices), shared_memory=True)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5C4E]))
    schedule = [sorted(rng.choice(devices, size=per_round, replace=False).tolist())
                for _ in range(rounds)]
    return Workload(data, schedule, seed=seed)


def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (``Pss`` of /proc/PID/smaps_rollup): its private
    pages plus its share of every page it shares, so summing it over a process tree counts
    each page once (the sum of RSS counts shared pages, e.g. the data table the workers map,
    once per process)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak PSS and peak summed RSS of this process and all its descendants, sampled every
    ``interval_s`` seconds in a daemon thread from :meth:`start` on, or less often where a
    sample takes longer than ``max_share`` of the interval: reading smaps_rollup walks a
    process's page tables, ~5-11 ms a process for forked workers that share a 1 GB parent
    (2-3 ms spawned), so sampling every 50 ms took up to 40% of a core from the run it
    measured, on the same pinned cores."""

    def __init__(self, interval_s: float = 0.05, max_share: float = 0.05) -> None:
        self.peak_pss = 0
        self.peak_rss = 0
        self.samples = 0
        self._interval_s = interval_s
        self._max_share = max_share
        self._stop = threading.Event()

    def start(self) -> TreeMemory:
        import psutil

        me = psutil.Process(os.getpid())

        def sample() -> None:
            wait = self._interval_s
            while not self._stop.wait(wait):
                began = time.perf_counter()
                try:
                    tree = [me, *me.children(recursive=True)]
                except psutil.Error:
                    continue
                pss = rss = 0
                for p in tree:
                    pss += _pss_bytes(p.pid)
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_pss = max(self.peak_pss, pss)
                self.peak_rss = max(self.peak_rss, rss)
                self.samples += 1
                took = time.perf_counter() - began
                wait = max(self._interval_s, took / self._max_share - took)

        threading.Thread(target=sample, daemon=True).start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        return {"peak_pss_mb": round(self.peak_pss / 2**20, 1),
                "peak_rss_sum_mb": round(self.peak_rss / 2**20, 1),
                "memory_samples": self.samples}


@dataclass
class Measurement:
    """Round end times; peak RSS of this process and its children, sampled in a thread."""

    round_ends: list[float] = field(default_factory=list)
    #: CPU seconds (user + system) of this process and its live descendants at the clock's
    #: start and at each round's end: a round's cost that a loaded machine stretches less
    #: than its wall time.
    cpu_marks: list[float] = field(default_factory=list)
    peak_rss: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # engine notes for the JSON line
    _start: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        import psutil

        self._start = time.perf_counter()
        self.cpu_marks = [tree_cpu_s()]
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
        if self.cpu_marks:
            self.cpu_marks.append(tree_cpu_s())

    def stop(self) -> None:
        self._stop.set()

    def rebase(self, start: float, round_ends: list[float]) -> None:
        """Takes the clock of a worker process (``perf_counter`` readings, which on Linux are
        the system-wide monotonic clock) instead of this process's."""
        self._start, self.round_ends = start, list(round_ends)

    def summary(self, workload: Workload) -> dict[str, Any]:
        ends = [self._start, *self.round_ends]
        rounds = len(self.round_ends)
        out: dict[str, Any] = {"rounds_done": rounds,
                               "peak_rss_mb": round(self.peak_rss / 2**20, 1), **self.extra}
        if rounds >= 1:
            out["round1_s"] = round(ends[1] - ends[0], 3)
            out["setup_s"] = round(self._start - _CHILD_STARTED, 3)
        if rounds >= 2:
            steady = ends[-1] - ends[1]
            sizes = workload.data.sizes()
            devices = sum(len(s) for s in workload.schedule[1:rounds])
            samples = sum(int(sizes[s].sum()) for s in workload.schedule[1:rounds])
            out.update(devices_per_s=round(devices / steady, 1),
                       samples_per_s=round(samples / steady), steady_rounds=rounds - 1,
                       round_s=[round(b - a, 3) for a, b in zip(ends, ends[1:], strict=False)])
        if len(self.cpu_marks) == rounds + 1 and rounds >= 1:
            marks = self.cpu_marks
            out["round_cpu_s"] = [round(b - a, 3) for a, b in zip(marks, marks[1:],
                                                                   strict=False)]
        return out


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    import psutil

    me = psutil.Process(os.getpid())
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


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
        import inspect

        from simulations.process_backend import ProcessCohortTrainer

        # Plain FedAvg: the workers sum the deltas, as fedctl simulate's from_config does
        # for such a task (simulations.process_backend.sums_suffice); an engine from before
        # that option returns every device's weights through shared rows.
        summed = "sum_deltas" in inspect.signature(ProcessCohortTrainer).parameters
        pool = ProcessCohortTrainer(table, processes, kind=kind, model=spec,
                                    local=workload.local, algorithm=AlgorithmConfig(),
                                    **({"sum_deltas": True} if summed else
                                       {"capacity": max(len(s) for s in workload.schedule)}))
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


def ours(workload: Workload, model: str, cores: int) -> tuple[Measurement, float]:
    """Our engine with ``engine.processes: cores``: on one core in this process, else the
    cohort split across ``cores`` worker processes."""
    return _run_in_process(workload, model, EngineKind.AUTO, 1, cores)


def sequential(workload: Workload, model: str, cores: int) -> tuple[Measurement, float]:
    if cores != 1:
        raise EngineSkipped("the sequential loop is one device at a time on one core")
    return _run_in_process(workload, model, EngineKind.LOOP, 1)


def flower(workload: Workload, model: str, cores: int) -> tuple[Measurement, float]:
    """Flower 1.42 ``run_simulation`` (Ray, ``cores`` ClientApp actors); see
    :mod:`benchmarks.flower_simulation`."""
    from benchmarks.flower_simulation import run_flower

    table = DeviceTable(workload.data)
    spec = MODELS[model]
    measure = Measurement()
    params = run_flower(x=table.x.numpy(), y=table.y.numpy(), offsets=table.offsets,
                        schedule=workload.schedule, seeds=workload.seeds, spec=spec,
                        local=workload.local, initial=initial_state(spec, workload.seed),
                        clock=measure, cpus=cores)
    return measure, _final_accuracy(workload, spec, params)


def pfl(workload: Workload, model: str, cores: int) -> tuple[Measurement, float]:
    """Apple's pfl 0.6 ``SimulatedBackend`` + ``FederatedAveraging``, in process on one core,
    else ``cores`` torchrun workers; see :mod:`benchmarks.pfl_simulation`."""
    from benchmarks.pfl_simulation import SCHEDULE, pfl_unavailable, run_pfl, run_pfl_distributed

    reason = pfl_unavailable()
    if reason is not None:
        raise EngineSkipped(reason)
    table = DeviceTable(workload.data)
    spec = MODELS[model]
    measure = Measurement()
    measure.extra["schedule"] = SCHEDULE
    job: dict[str, Any] = dict(x=table.x.numpy(), y=table.y.numpy(), offsets=table.offsets,
                               schedule=workload.schedule, seeds=workload.seeds, spec=spec,
                               local=workload.local, initial=initial_state(spec, workload.seed))
    if cores == 1:
        params = run_pfl(**job, clock=measure)
    else:
        measure.extra["launcher"] = f"torchrun --standalone --nproc_per_node={cores} (gloo)"
        measure.start()  # samples the workers' memory; the times are worker 0's
        params, started, ends = run_pfl_distributed(workers=cores, **job)
        measure.stop()
        measure.rebase(started, ends)
    return measure, _final_accuracy(workload, spec, params)


#: Engine name -> runner (see the module docstring for the contract).
ENGINES: dict[str, Callable[[Workload, str, int], tuple[Measurement, float]]] = {
    "sequential": sequential,
    "flower": flower,
    "pfl": pfl,
    "ours": ours,
}


def engine_version(engine: str) -> str:
    """The measured package's version (torch's for the sequential loop)."""
    import importlib.metadata

    package = {"flower": "flwr", "pfl": "pfl", "ours": "fedcoord", "sequential": "torch"}[engine]
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


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


def _hand_step_s(dims: list[int], devices: int, batch: int, repeat: int) -> float:
    """Seconds per device-step of the least work one SGD step of the MLP ``dims`` can be:
    forward, backward and the update fused into the weight-gradient product (``baddbmm_``),
    on ``devices`` devices' stacked weights at once (1: a plain per-device step)."""
    ws = [torch.randn(devices, o, i) * 0.01 for i, o in zip(dims, dims[1:], strict=False)]
    bs = [torch.zeros(devices, 1, o) for o in dims[1:]]
    x = torch.randn(devices, batch, dims[0])
    target = torch.zeros(devices, batch, dims[-1])
    target[:, :, 0] = -1.0 / batch
    ones = torch.ones(devices, 1, batch)

    def step() -> None:
        h, inputs = x, [x]
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            h = torch.baddbmm(b, h, w.transpose(1, 2))
            if i < len(ws) - 1:
                h = h.relu_()
                inputs.append(h)
        g = torch.softmax(h, dim=2).div_(batch).add_(target)
        for i in range(len(ws) - 1, -1, -1):
            back = torch.bmm(g, ws[i]) if i > 0 else None
            ws[i].baddbmm_(g.transpose(1, 2), inputs[i], alpha=-0.01)
            bs[i].baddbmm_(ones, g, alpha=-0.01)
            if back is not None:
                g = torch.ops.aten.threshold_backward(back, inputs[i], 0.0)

    with torch.no_grad():
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(repeat):
            step()
        return (time.perf_counter() - t0) / repeat / devices


def _plain_step_s(model: str, batch: int, repeat: int) -> float:
    """Seconds of one step of the plain loop (``core.training.train_local``'s inner loop:
    zero_grad, the model, cross-entropy, backward, SGD's step) on one device."""
    net = build_model(MODELS[model])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    features = torch.randn(4 * batch, LAYERS[model][0])
    labels = torch.randint(0, LAYERS[model][-1], (4 * batch,))
    batches = torch.split(torch.randperm(4 * batch), batch)

    def step(index: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(features[index]), labels[index])
        torch.autograd.backward(loss)
        optimizer.step()

    for index in batches:
        step(index)
    t0 = time.perf_counter()
    for i in range(repeat):
        step(batches[i % len(batches)])
    return (time.perf_counter() - t0) / repeat


def _gemm_s(dims: list[int], batch: int, repeat: int) -> float:
    """Seconds of only the matrix products one SGD step of the MLP ``dims`` needs on one
    device (forward ``h W^T``, weight gradient ``g^T h``, input gradient ``g W`` but for
    the first layer), into preallocated outputs: what is left of a step without any
    other op, dispatch or Python."""
    ws = [torch.randn(o, i) * 0.01 for i, o in zip(dims, dims[1:], strict=False)]
    hs = [torch.randn(batch, d) for d in dims]
    outs_f = [torch.empty(batch, w.shape[0]) for w in ws]
    outs_w = [torch.empty_like(w) for w in ws]
    outs_i = [torch.empty(batch, w.shape[1]) for w in ws]

    def products() -> None:
        for i, w in enumerate(ws):
            torch.mm(hs[i], w.t(), out=outs_f[i])
        for i in range(len(ws) - 1, -1, -1):
            torch.mm(hs[i + 1].t(), hs[i], out=outs_w[i])
            if i > 0:
                torch.mm(hs[i + 1], ws[i], out=outs_i[i])

    for _ in range(3):
        products()
    t0 = time.perf_counter()
    for _ in range(repeat):
        products()
    return (time.perf_counter() - t0) / repeat


def floor(model: str, devices: int = 1000) -> dict[str, Any]:
    """What one core can do at most on ``model``: the workload's FLOPs per device, torch's
    one-thread matmul rate (2048 x 2048 and the step's own shapes), and the devices/s per
    core those rates allow, with stacked weights of 1, 4 and 16 devices per batched product
    (batching over devices cannot raise a step's arithmetic intensity: every device has its
    own weights, each used ``batch_size`` times per product)."""
    workload = make_workload(devices=devices, rounds=1)
    dims, batch = LAYERS[model], workload.local.batch_size
    sizes = workload.data.sizes()
    mean_examples = float(sizes.mean())
    mean_steps = float(np.ceil(sizes / batch).mean())
    per_device = train_flops_per_sample(model) * mean_examples
    out: dict[str, Any] = {"benchmark": "simulation_floor", "model": model, "batch": batch,
                           "parameters": sum(a * b + b for a, b in zip(dims, dims[1:],
                                                                        strict=False)),
                           "mean_examples_per_device": round(mean_examples, 1),
                           "mean_steps_per_device": round(mean_steps, 1),
                           "train_gflop_per_device": round(per_device / 1e9, 3),
                           "matmul_gflops_1_thread_2048": round(matmul_gflops(1), 1)}
    step_flops = train_flops_per_sample(model) * batch
    # How much of the plain loop's step is overhead (dispatch, Python, autograd, the
    # optimizer) that batching devices could remove: the step against its products alone.
    repeat = max(20, 4000 // len(dims) // max(1, out["parameters"] // 50_000))
    plain = _plain_step_s(model, batch, repeat)
    gemm = _gemm_s(dims, batch, repeat)
    out.update(plain_step_ms=round(plain * 1e3, 4), gemm_only_ms=round(gemm * 1e3, 4),
               plain_step_gflops=round(step_flops / plain / 1e9, 1),
               plain_step_overhead_share=round(1.0 - gemm / plain, 3),
               plain_step_over_gemm_only=round(plain / gemm, 2))
    best = float("inf")
    for stacked in (1, 4, 16):
        t = _hand_step_s(dims, stacked, batch, repeat=max(3, 2000 // (stacked * len(dims))))
        out[f"hand_step_ms_{stacked}_stacked"] = round(t * 1e3, 4)
        out[f"hand_step_gflops_{stacked}_stacked"] = round(step_flops / t / 1e9, 1)
        out[f"ceiling_devices_per_s_per_core_{stacked}_stacked"] = round(
            1.0 / (t * mean_steps), 1)
        best = min(best, t)
    # The most a trainer of this kind could gain per core over the plain loop.
    out["plain_step_over_best_hand_step"] = round(plain / best, 2)
    return out


# -- parent: one child process group per (engine, model, cores) -------------------------------


def _run_child(engine: str, model: str, cores: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--engines", engine,
           "--models", model, "--rounds", str(args.rounds), "--cores", str(cores),
           "--devices", str(args.devices), "--per-round", str(args.per_round),
           *(["--no-pss"] if args.no_pss else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    log_path = Path(args.log_dir) / f"simulation-{engine}-{model}-{cores}cores.log"
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
    return {"benchmark": "simulation", "engine": engine, "model": model, "cores": cores,
            "error": f"{error or 'no result'}; log: {log_path}", "log_tail": tail}


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
    global _CHILD_STARTED
    # From the start: data loading and workers' start-up count. --no-pss: none (reading
    # smaps_rollup stalls the process read, the more so the more it shares).
    memory = TreeMemory() if args.no_pss else TreeMemory().start()
    engine, model, cores = args.engines, args.models, args.cores
    head: dict[str, Any] = {"benchmark": "simulation", "engine": engine,
                            "engine_version": engine_version(engine), "model": model,
                            "cores": cores, "processes": cores}
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < cores:
        print(json.dumps({**head, "skipped": f"{cores} cores asked, {len(allowed)} here"}))
        return
    # Pinned before anything starts: Ray's daemons and actors, torchrun's workers and our
    # worker processes inherit the mask, so "cores" is what the whole run may use.
    os.sched_setaffinity(0, allowed[:cores])
    head["cpus"] = allowed[:cores]
    _CHILD_STARTED = time.perf_counter()
    workload = make_workload(devices=args.devices, per_round=args.per_round, rounds=args.rounds)
    torch.set_num_threads(1)
    head.update(devices=workload.data.num_devices, per_round=len(workload.schedule[0]),
                rounds=len(workload.schedule), torch_threads_per_process=1)
    try:
        measure, accuracy = ENGINES[engine](workload, model, cores)
    except EngineSkipped as e:
        print(json.dumps({**head, "skipped": str(e)}), flush=True)
        return
    sampled = {} if args.no_pss else memory.stop()  # no PSS samples: no PSS figures
    print(json.dumps({**head, **measure.summary(workload), **sampled,
                      "final_accuracy": round(accuracy, 4)}), flush=True)


def _compare(rows: list[dict[str, Any]], model: str, base_accuracy: float | None,
             ceiling: float, base_rate: float | None = None) -> None:
    """Adds FLOP rates, the accuracy check and, on our line, the speed-ups within a group."""
    for row in rows:
        if "samples_per_s" in row:
            row["gflops"] = round(train_flops_per_sample(model) * row["samples_per_s"] / 1e9, 2)
            row["matmul_gflops_1_thread"] = ceiling
        if base_accuracy is not None and "final_accuracy" in row:
            row["accuracy_minus_sequential"] = round(row["final_accuracy"] - base_accuracy, 4)
            row["accuracy_matches"] = abs(row["final_accuracy"] - base_accuracy) <= 0.01
    ours = next((r for r in rows if r["engine"] == "ours" and r.get("devices_per_s")), None)
    if ours is not None:
        ours["speedup"] = {r["engine"]: round(ours["devices_per_s"] / r["devices_per_s"], 2)
                           for r in rows if r is not ours and r.get("devices_per_s")}
        if base_rate:
            # Per core against the plain loop's most recent one-core run of this model.
            ours["per_core_vs_sequential"] = round(
                ours["devices_per_s"] / ours["cores"] / base_rate, 2)


@functools.cache
def round_samples(devices: int, per_round: int, rounds: int) -> list[int]:
    """Training examples of each round of the workload (its schedule's devices' sizes)."""
    workload = make_workload(devices=devices, per_round=per_round, rounds=rounds)
    sizes = workload.data.sizes()
    return [int(sizes[s].sum()) for s in workload.schedule]


def summarize(paths: list[str]) -> list[dict[str, Any]]:
    """Per (tree, engine, model, cores, devices) in JSON-lines files of this benchmark's
    rows (``tree``: a label added to each row, e.g. before/after a change): the run count
    and the median and min-max of devices/s, of round 1's extra seconds over the median
    steady round (``startup_s``), of round 1's seconds beyond its own examples trained at
    the steady rounds' seconds per example (``startup_adj_s``: what the first round costs
    beyond training; each round trains other devices, ~2x apart in examples), of the same
    in CPU seconds of the process tree (``startup_cpu_s``, from ``round_cpu_s``: less
    stretched by a loaded machine than wall time), of ``setup_s``, of the tree's peak PSS
    and of ``per_core_vs_sequential``; with the load
    averages of lines ``{"load": "1m 5m 15m"}`` found among them."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    floors: dict[str, list[dict[str, Any]]] = {}
    loads: list[float] = []
    for path in paths:
        for text in Path(path).read_text().splitlines():
            if not text.startswith("{"):
                continue
            row = json.loads(text)
            if "load" in row:
                loads.append(float(row["load"].split()[0]))
            if row.get("benchmark") == "simulation_floor":
                floors.setdefault(row["model"], []).append(row)
            if row.get("benchmark") != "simulation" or "round_s" not in row:
                continue
            steady = row["round_s"][1:]
            row["startup_s"] = round(row["round1_s"] - float(np.median(steady)), 3)
            # Rounds train different devices: round 1's own work at the steady rate.
            samples = round_samples(row["devices"], row["per_round"], len(row["round_s"]))
            per_sample = sum(steady) / sum(samples[1:])
            row["startup_adj_s"] = round(row["round1_s"] - samples[0] * per_sample, 3)
            if len(row.get("round_cpu_s", [])) >= 2:
                cpu = row["round_cpu_s"]
                row["startup_cpu_s"] = round(
                    cpu[0] - samples[0] * sum(cpu[1:]) / sum(samples[1:]), 3)
            key = (row.get("tree", ""), row["engine"], row["model"], row["cores"],
                   row["devices"])
            groups.setdefault(key, []).append(row)
    out = []
    for (tree, engine, model, cores, devices), rows in groups.items():
        line: dict[str, Any] = {"benchmark": "simulation_summary", "tree": tree,
                                "engine": engine, "model": model, "cores": cores,
                                "devices": devices, "runs": len(rows)}
        for name in ("devices_per_s", "startup_s", "startup_adj_s", "startup_cpu_s", "setup_s",
                     "peak_pss_mb",
                     "peak_rss_sum_mb", "per_core_vs_sequential"):
            values = [r[name] for r in rows if r.get(name) is not None]
            if values:
                line[name] = {"median": round(float(np.median(values)), 3),
                              "min": min(values), "max": max(values)}
        if loads:
            line["load_1m"] = {"min": min(loads), "max": max(loads)}
        out.append(line)
    for model, rows in floors.items():
        line = {"benchmark": "simulation_floor_summary", "model": model, "runs": len(rows)}
        for name in ("plain_step_ms", "gemm_only_ms", "hand_step_ms_1_stacked",
                     "hand_step_ms_16_stacked", "plain_step_over_gemm_only",
                     "plain_step_over_best_hand_step", "matmul_gflops_1_thread_2048"):
            values = [r[name] for r in rows if r.get(name) is not None]
            if values:
                line[name] = {"median": round(float(np.median(values)), 4),
                              "min": min(values), "max": max(values)}
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=DEFAULT_ENGINES,
                        help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--models", default="lr,mlp",
                        help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--cores", default="1,2",
                        help="comma list: each group pins every engine to this many cores")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each group; the engine order flips every other run")
    parser.add_argument("--rounds", type=int, default=20, help="round 1 is timed apart")
    parser.add_argument("--devices", type=int, default=1000, help="devices in the federation")
    parser.add_argument("--per-round", type=int, default=100, help="devices trained a round")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="hard limit in seconds for each (engine, model, cores) child")
    parser.add_argument("--log-dir", default=os.environ.get("TMPDIR", "/tmp"),
                        help="where each child's stderr goes")
    parser.add_argument("--no-pss", action="store_true",
                        help="no PSS sampling (speed runs: a sample stalls the processes it "
                             "reads, forked ones more than spawned ones)")
    parser.add_argument("--skip", default="",
                        help="comma list of engine:cores runs to leave out, e.g. ours:1")
    parser.add_argument("--floor", action="store_true",
                        help="print each model's one-core ceiling (simulation_floor) and exit")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL",
                        help="print medians and ranges of these result files' rows and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summarize:
        for line in summarize(args.summarize):
            print(json.dumps(line))
        return
    if args.floor:
        torch.set_num_threads(1)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
        for model in args.models.split(","):
            print(json.dumps(floor(model, args.devices)), flush=True)
        return
    if args.child:
        args.cores = int(args.cores)
        _child(args)
        return
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {list(ENGINES)}")
    engines.sort(key=list(ENGINES).index)  # peers first, ours last (flipped every other run)
    torch.set_num_threads(1)
    ceiling = round(matmul_gflops(1), 1)
    base_accuracy: dict[str, float] = {}
    base_rate: dict[str, float] = {}
    for model in args.models.split(","):
        for cores in (int(c) for c in args.cores.split(",")):
            for repeat in range(args.repeat):
                order = engines if repeat % 2 == 0 else engines[::-1]
                order = [e for e in order if not (e == "sequential" and cores != 1)
                         and f"{e}:{cores}" not in args.skip.split(",")]
                rows = []
                for engine in order:
                    row = _run_child(engine, model, cores, args)
                    row["repeat"] = repeat
                    if engine == "sequential" and "final_accuracy" in row:
                        base_accuracy.setdefault(model, row["final_accuracy"])
                    if engine == "sequential" and row.get("devices_per_s"):
                        base_rate[model] = row["devices_per_s"]
                    rows.append(row)
                _compare(rows, model, base_accuracy.get(model), ceiling, base_rate.get(model))
                for row in rows:  # in run order; ours carries the group's speed-ups
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
