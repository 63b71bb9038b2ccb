"""Worker processes on this machine (``engine.processes``): a round's cohort is split across
them by cost (steps, longest first), each trains its share with the configured in-process
trainer, and the results are merged back in job order.

Threads cannot do this: a trainer's step is a dozen small torch calls, each of which gives
up and takes back the GIL, so two training threads spend their time waiting for each other
(measured on the bmm trainer: two threads on two cores were no faster than one, while two
processes each kept one thread's speed). Processes also train models too large to batch
(the ``loop`` trainer), one device per process at a time.

The data table is placed in shared memory once and mapped by every worker (no copy per
worker). Workers are forked from this process, all of them when the trainer is built, with
the objects alive then frozen (``gc.freeze``), so torch's import and everything else this
process holds are shared pages, not a copy per worker (``spawn`` imported torch again in
each: ~110 MB private per worker). Each trains one step before it reports ready, so the
first round pays neither the start-up nor the first call's allocations.

Per round, a worker receives the global weights and its jobs. Where the round needs only
FedAvg's mean (plain FedAvg and FedProx: :func:`sums_suffice`), it returns its devices'
example-weighted sum of deltas, one model's worth of float64, so the cohort's weights are
never held anywhere at once. Otherwise it writes its devices' weights into shared rows (or,
for a cohort larger than the shared room, returns them pickled: this stays inside the
simulation, the production wire never pickles), and the trained weights the parent returns
are views of those rows, not a copy.

Memory: a worker trains its share in slices of at most ``slice_bytes`` of weights (sorted by
steps, so the lock-step groups stay whole for small models), so a large model's cohort is
never held twice in a worker.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import gc
import multiprocessing.context
import multiprocessing.synchronize
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.models import initial_state
from core.types import AggregationMode, LocalTraining, ModelSpec, RobustKind
from simulations.algorithms import local_objective
from simulations.cohort import (
    CohortResult,
    CohortTrainer,
    DeviceJob,
    DeviceTable,
    full_steps,
    lock_step_devices,
    resolve_kind,
)
from simulations.cohort import make_trainer as make_cohort_trainer
from simulations.cohort_split import LOCK_STEP_OVERHEAD, merge_results, split_jobs
from simulations.config import (
    AlgorithmConfig,
    AlgorithmKind,
    EngineKind,
    SimulationConfig,
    load_apps,
)
from simulations.errors import SimulationError
from simulations.memory import return_freed_heap, shared_empty


@dataclass(frozen=True)
class _Setup:
    kind: EngineKind
    model: ModelSpec
    local: LocalTraining
    algorithm: AlgorithmConfig
    threads: int
    #: Apps (``module:attribute``) whose models and data sources the worker registers first.
    apps: tuple[str, ...] = ()
    #: Weight bytes a worker trains at once (ProcessCohortTrainer: slice_bytes).
    slice_bytes: int = 64 << 20
    #: Workers return their devices' example-weighted sum of deltas, not the devices' weights.
    sum_deltas: bool = False
    #: Hand the freed heap back after each round (large models only: see _TRIM_MODEL_BYTES).
    trim: bool = False


@dataclass(frozen=True)
class _Shared:
    """Tensors in shared memory that the parent and every worker map."""

    #: The round's global weights (the parent writes them, the workers read them).
    global_params: dict[str, torch.Tensor]
    #: ``[capacity, ...]`` rows the workers write their devices' weights into.
    out: dict[str, torch.Tensor]
    #: With ``sum_deltas``, one flat float64 sum per tensor for each of the round's parts.
    sums: list[dict[str, torch.Tensor]]


_trainer: CohortTrainer | None = None  # the worker process's trainer (set by _start)
_shared: _Shared | None = None
_sizes: np.ndarray = np.zeros(0, dtype=np.int64)
_setup: _Setup | None = None
_ready: multiprocessing.synchronize.Barrier | None = None
#: Elements added at once into a sum of deltas (bounds the temporaries: 2 MiB of float64).
_SUM_CHUNK = 1 << 18
#: Weights per device from which the parent and the workers hand their freed heap back after
#: each round (a 1.07M-parameter MLP's round frees tens of MB per process). Below it the
#: buffers are a few MB, and trimming cost more than it saved: the pages are faulted in
#: again next round (measured 5-10% of the 54k MLP's round CPU).
_TRIM_MODEL_BYTES = 1 << 20


def _start(setup: _Setup, table: DeviceTable, shared: _Shared,
           ready: multiprocessing.synchronize.Barrier) -> None:
    global _trainer, _shared, _sizes, _setup, _ready
    _shared, _sizes, _setup, _ready = shared, table.sizes, setup, ready
    torch.set_num_threads(setup.threads)
    load_apps(setup.apps)
    _trainer = make_cohort_trainer(setup.kind, setup.model, table, setup.local,
                                   local_objective(setup.algorithm))


def _warm(timeout_s: float) -> int:
    """Trains one step of device 0 (first calls allocate and pick kernels), then waits
    until every worker has done so: run once per worker, the barrier makes each call land on
    a different process. Returns this worker's pid."""
    import os

    assert _trainer is not None and _ready is not None and _shared is not None, \
        "worker not started"
    _trainer.train(_shared.global_params, [DeviceJob(0, 0, max_steps=1)])
    _ready.wait(timeout_s)
    return os.getpid()


def _train(jobs: list[DeviceJob], corrections: dict[str, np.ndarray] | None,
           positions: list[int] | None, part: int) -> CohortResult:
    """Trains ``jobs`` from the shared global weights; with ``sum_deltas`` writes their
    example-weighted sum of deltas into the shared sums of part ``part``; else writes job
    ``i``'s weights into row ``positions[i]`` of the shared rows, or with
    ``positions=None`` returns the weights (pickled back: the only result with weights)."""
    assert _trainer is not None and _setup is not None and _shared is not None, \
        "worker not started"
    params = _shared.global_params
    corr = None if corrections is None else {n: torch.from_numpy(v)
                                             for n, v in corrections.items()}
    if _setup.sum_deltas or positions is not None:
        per_device = sum(v.nbytes for v in params.values())
        size = max(1, _setup.slice_bytes // max(per_device, 1))
        full = [full_steps(int(_sizes[j.device]), _setup.local) for j in jobs]
        costs = np.array([f if j.max_steps is None else min(f, j.max_steps)
                          for j, f in zip(jobs, full, strict=True)])
        order = np.argsort(-costs, kind="stable")
        steps = np.zeros(len(jobs), dtype=np.int64)
        examples = np.zeros(len(jobs), dtype=np.int64)
        loss = np.zeros(len(jobs), dtype=np.float64)
        sums = None
        if _setup.sum_deltas:
            sums = {n: t.numpy() for n, t in _shared.sums[part].items()}
            for total in sums.values():
                total.fill(0.0)
        for lo in range(0, len(jobs), size):
            chosen = order[lo:lo + size]
            result = _trainer.train(
                params, [jobs[i] for i in chosen],
                None if corr is None else {n: c[chosen] for n, c in corr.items()})
            if sums is not None:
                _add_weighted_deltas(sums, params, result)
            else:
                assert positions is not None
                rows = torch.tensor([positions[i] for i in chosen], dtype=torch.int64)
                for name, weights in result.params.items():
                    _shared.out[name].index_copy_(0, rows, weights)
            steps[chosen], examples[chosen], loss[chosen] = (
                result.steps, result.num_examples, result.loss)
            del result  # before the next slice allocates its own
        if _setup.trim:
            return_freed_heap()  # the slices' buffers, before this worker idles
        return CohortResult(params={}, steps=steps, num_examples=examples, loss=loss)
    result = _trainer.train(params, jobs, corr)
    return CohortResult(params={n: p.numpy() for n, p in result.params.items()},  # type: ignore[misc]
                        steps=result.steps, num_examples=result.num_examples,
                        loss=result.loss)


def _add_weighted_deltas(sums: dict[str, np.ndarray], global_params: dict[str, torch.Tensor],
                         result: CohortResult) -> None:
    """Adds ``num_examples[i] * (trained_i - global)`` of each device of ``result`` into
    ``sums``, one device at a time, as the coordinator's
    :class:`~core.aggregation.fedavg.StreamingWeightedMean` adds an update (the float32
    delta times the weight, in float64), in chunks of ``_SUM_CHUNK`` elements."""
    for name, x in global_params.items():
        trained = result.params[name].numpy()
        flat = x.numpy().reshape(-1)
        total = sums[name]
        for device, weight in zip(trained, result.num_examples.tolist(), strict=True):
            values = device.reshape(-1)
            for lo in range(0, flat.size, _SUM_CHUNK):
                hi = lo + _SUM_CHUNK
                total[lo:hi] += np.multiply(values[lo:hi] - flat[lo:hi], float(weight),
                                            dtype=np.float64)


def _lock_step_overhead(kind: EngineKind, model: ModelSpec, table: DeviceTable,
                        local: LocalTraining) -> float:
    """``split_jobs``' lock-step term for the trainer ``kind`` builds: none where devices
    train one after another, i.e. the loop, and the bmm trainer on a model whose lock-step
    groups hold one device (a 1.07M-parameter MLP: 4.3 MB of weights). There a worker's
    time is the sum of its devices' steps, and charging the longest device a second time
    left its worker idle for up to half the round."""
    resolved = resolve_kind(kind, model, table, local)
    if resolved is EngineKind.LOOP:
        return 0.0
    per_device = sum(v.nbytes for v in initial_state(model, 0).values())
    if resolved is EngineKind.BMM and lock_step_devices(per_device) == 1:
        return 0.0
    return LOCK_STEP_OVERHEAD


def sums_suffice(config: SimulationConfig) -> bool:
    """Whether ``config``'s rounds need only the cohort's example-weighted sum of deltas:
    synchronous FedAvg or FedProx with the plain mean, no secure aggregation and no central
    DP (SCAFFOLD, those and the robust rules need each device's model)."""
    return (config.aggregation.mode is AggregationMode.SYNC
            and config.algorithm.kind is not AlgorithmKind.SCAFFOLD
            and config.secure_aggregation is None and config.privacy is None
            and config.aggregation.robust.kind is RobustKind.MEAN)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers are forked from this process (``fork``), so they share its pages, torch's
    import and the data included, instead of importing torch again each (``spawn``: ~110
    MB private per worker on the development machine; a fork server shares its import
    between the workers but not with this process: measured 689 MB peak PSS against 514
    forked, 1.07M-parameter MLP, 1000 devices, 2 workers).

    This is the start DataLoader's workers use: a fork of a process that has run torch
    ops, in which the workers set their torch threads (``threads``, 1 by default) before
    their first op. The executor forks every worker before it starts its own thread."""
    import torch.multiprocessing as tmp

    return tmp.get_context("fork")


class ProcessCohortTrainer:
    """``processes`` worker processes training the cohort with the ``kind`` engine (as
    :func:`simulations.cohort.make_trainer` builds it, ``threads`` torch threads each, after
    registering ``apps``: workers start without the parent's registrations). Use as a
    context manager, or call :meth:`shutdown`; :meth:`from_config` takes a simulation's
    settings.

    With ``sum_deltas`` (plain FedAvg and FedProx rounds: :func:`sums_suffice`) each worker
    adds its devices' example-weighted deltas into one float64 sum per tensor in shared
    memory (:attr:`CohortResult.delta_sum`: a view, valid until the next :meth:`train`),
    so no device's weights leave a worker, and a worker holds at most ``slice_bytes`` of
    them (default 4 MiB then, the bmm trainer's lock-step group: one device of a
    1.07M-parameter MLP, 19 of a 54k-parameter MLP).

    Otherwise devices' weights come back through shared memory for cohorts of up to
    ``capacity`` devices (pickling them back cost ~100 ms a round for 100 devices of 54k
    parameters on the development machine); larger cohorts are pickled. The returned
    ``params`` are then views of the shared rows, valid until the next :meth:`train` (every
    caller aggregates a round before training the next); copy them to keep them longer.
    A worker trains at most ``slice_bytes`` (default 64 MiB) of its devices' weights at
    once (a 1.07M-parameter MLP's cohort 15 devices at a time, while a 54k-parameter MLP's
    share, 300 devices, stays whole, so its lock-step groups do too).

    The constructor returns once every worker has started and trained one step (within
    ``start_timeout_s`` seconds).

    Raises:
        ValueError: ``processes`` below 2.
    """

    def __init__(self, table: DeviceTable, processes: int, *, kind: EngineKind,
                 model: ModelSpec, local: LocalTraining, algorithm: AlgorithmConfig,
                 threads: int = 1, capacity: int = 0, apps: tuple[str, ...] = (),
                 start_timeout_s: float = 300.0, slice_bytes: int | None = None,
                 sum_deltas: bool = False) -> None:
        if processes < 2:
            raise ValueError(f"processes must be at least 2, got {processes}")
        if slice_bytes is None:
            slice_bytes = (4 if sum_deltas else 64) << 20
        capacity = 0 if sum_deltas else capacity
        initial = initial_state(model, 0)
        try:
            table.share_memory()
            self._shared = _Shared(
                global_params={n: shared_empty(v.shape, torch.from_numpy(v).dtype)
                               for n, v in initial.items()},
                # untouched pages cost nothing until the workers write their rows
                out={n: shared_empty((capacity, *v.shape), torch.from_numpy(v).dtype)
                     for n, v in initial.items()} if capacity else {},
                sums=[{n: shared_empty((v.size,), torch.float64) for n, v in initial.items()}
                      for _ in range(processes)] if sum_deltas else [])
        except (RuntimeError, OSError) as exc:
            raise SimulationError(f"cannot place the data and the cohort's weights in shared "
                                  f"memory for worker processes: {exc}") from exc
        for name, value in initial.items():
            self._shared.global_params[name].copy_(torch.from_numpy(value))
        self._sizes = table.sizes
        self._local = local
        self._processes = processes
        self._overhead = _lock_step_overhead(kind, model, table, local)
        self._capacity = capacity
        self._sum_deltas = sum_deltas
        self._trim = sum(v.nbytes for v in initial.values()) >= _TRIM_MODEL_BYTES
        setup = _Setup(kind, model, local, algorithm, threads, apps, slice_bytes, sum_deltas,
                       self._trim)
        context = _worker_context()
        # The objects alive now are the workers' too: frozen, the collector never writes
        # their headers, here or in a worker, so their pages stay shared (gc.freeze's use).
        gc.collect()
        gc.freeze()
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=context,
            initializer=_start, initargs=(setup, table, self._shared,
                                          context.Barrier(processes)))
        try:
            warm = [self._pool.submit(_warm, start_timeout_s)
                    for _ in range(processes)]
            pids = {f.result(timeout=start_timeout_s) for f in warm}
        except (concurrent.futures.process.BrokenProcessPool, threading.BrokenBarrierError,
                TimeoutError) as exc:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise SimulationError(f"the {processes} simulation worker processes did not "
                                  f"start within {start_timeout_s:.0f} s: {exc!r}") from exc
        assert len(pids) == processes, pids
        self._pids = sorted(pids)

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (all started by the constructor)."""
        return list(self._pids)

    @classmethod
    def from_config(cls, config: SimulationConfig, table: DeviceTable) -> ProcessCohortTrainer:
        """``config.engine.processes`` workers running ``config``'s engine and algorithm,
        summing the deltas where the round needs only their mean (:func:`sums_suffice`),
        else with room in shared memory for the round's admitted devices."""
        return cls(table, config.engine.processes, kind=config.engine.kind,
                   model=config.model, local=config.local, algorithm=config.algorithm,
                   threads=config.engine.threads, capacity=config.selection.admitted,
                   apps=config.apps, sum_deltas=sums_suffice(config))

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        if self._trim:
            return_freed_heap()  # what the last round's aggregation freed
        full = [full_steps(int(self._sizes[j.device]), self._local) for j in jobs]
        costs = [f if j.max_steps is None else min(f, j.max_steps)
                 for j, f in zip(jobs, full, strict=True)]
        groups = [g for g in split_jobs(jobs, costs, self._processes,
                                        lock_step_overhead=self._overhead) if g]
        for name, value in global_params.items():
            self._shared.global_params[name].copy_(value.detach())
        shared = len(jobs) <= self._capacity
        try:
            futures = [self._pool.submit(
                _train, [jobs[i] for i in group],
                None if corrections is None else {n: c[group].numpy()
                                                  for n, c in corrections.items()},
                group if shared else None, part)
                for part, group in enumerate(groups)]
            # Every worker finishes (or fails) before anything is read: a failed worker must
            # not leave another still writing into the shared rows while the caller goes on.
            concurrent.futures.wait(futures)
            parts = [f.result() for f in futures]
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise SimulationError(f"a simulation worker process died: {exc} (too little "
                                  "shared memory in /dev/shm for the cohort's weights, or "
                                  "out of memory?)") from exc
        if not self._sum_deltas and not shared:
            return merge_results(groups, parts, global_params)
        order = np.argsort(np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]),
                           kind="stable")
        delta_sum = None
        if self._sum_deltas:
            # The parts' sums added into the first part's (a view, valid until the next call).
            delta_sum = {n: t.numpy() for n, t in self._shared.sums[0].items()}
            for part in range(1, len(groups)):
                for name, total in delta_sum.items():
                    total += self._shared.sums[part][name].numpy()
        return CohortResult(
            params={} if self._sum_deltas else {n: self._shared.out[n][:len(jobs)]
                                                for n in global_params},
            steps=np.concatenate([p.steps for p in parts])[order],
            num_examples=np.concatenate([p.num_examples for p in parts])[order],
            loss=np.concatenate([p.loss for p in parts])[order],
            delta_sum=delta_sum)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessCohortTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
