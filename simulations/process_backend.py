"""Worker processes on this machine (``engine.processes``): a round's cohort is split across
them by cost (steps, longest first), each trains its share with the configured in-process
trainer, and the results are merged back in job order.

Threads cannot do this: a trainer's step is a dozen small torch calls, each of which gives
up and takes back the GIL, so two training threads spend their time waiting for each other
(measured on the bmm trainer: two threads on two cores were no faster than one, while two
processes each kept one thread's speed). Processes also train models too large to batch
(the ``loop`` trainer), one device per process at a time.

The data table is placed in shared memory once and mapped by every worker (no copy per
worker); per round, a worker receives the global weights and its jobs and writes its
devices' weights into shared rows (or, for a cohort larger than the shared room, returns
them pickled: this stays inside the simulation, the production wire never pickles). Workers
are started with ``spawn`` (no fork of a process that has torch threads), all of them when
the trainer is built, and each trains one step before it reports ready, so the first round
pays neither the start-up (torch's import, ~1-3 s) nor the first call's allocations.

Memory: a worker trains its share in slices of at most ``slice_bytes`` of weights
(sorted by steps, so the lock-step groups stay whole for small models) and copies each into
the shared rows, so a large model's cohort is never held twice in a worker; the trained
weights the parent returns are views of the shared rows, not a copy.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import multiprocessing.synchronize
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.models import initial_state
from core.types import LocalTraining, ModelSpec
from simulations.algorithms import local_objective
from simulations.cohort import CohortResult, CohortTrainer, DeviceJob, DeviceTable, full_steps
from simulations.cohort import make_trainer as make_cohort_trainer
from simulations.cohort_split import LOCK_STEP_OVERHEAD, merge_results, split_jobs
from simulations.config import AlgorithmConfig, EngineKind, SimulationConfig, load_apps
from simulations.errors import SimulationError


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


_trainer: CohortTrainer | None = None  # the worker process's trainer (set by _start)
_out: dict[str, torch.Tensor] = {}  # shared [capacity, ...] weights the workers write
_sizes: np.ndarray = np.zeros(0, dtype=np.int64)
_setup: _Setup | None = None
_ready: multiprocessing.synchronize.Barrier | None = None


def _start(setup: _Setup, table: DeviceTable, out: dict[str, torch.Tensor],
           ready: multiprocessing.synchronize.Barrier) -> None:
    global _trainer, _out, _sizes, _setup, _ready
    _out, _sizes, _setup, _ready = out, table.sizes, setup, ready
    torch.set_num_threads(setup.threads)
    load_apps(setup.apps)
    _trainer = make_cohort_trainer(setup.kind, setup.model, table, setup.local,
                                   local_objective(setup.algorithm))


def _warm(global_params: dict[str, np.ndarray], timeout_s: float) -> int:
    """Trains one step of device 0 (first calls allocate and pick kernels), then waits
    until every worker has done so: run once per worker, the barrier makes each call land on
    a different process. Returns this worker's pid."""
    import os

    assert _trainer is not None and _ready is not None, "worker not started"
    _trainer.train({n: torch.from_numpy(v) for n, v in global_params.items()},
                   [DeviceJob(0, 0, max_steps=1)])
    _ready.wait(timeout_s)
    return os.getpid()


def _train(global_params: dict[str, np.ndarray], jobs: list[DeviceJob],
           corrections: dict[str, np.ndarray] | None, positions: list[int] | None
           ) -> CohortResult:
    """Trains ``jobs``; writes job ``i``'s weights into row ``positions[i]`` of the shared
    tensors (the result then carries no weights), or with ``positions=None`` returns the
    weights (pickled back)."""
    assert _trainer is not None and _setup is not None, "worker not started"
    params = {n: torch.from_numpy(v) for n, v in global_params.items()}
    corr = None if corrections is None else {n: torch.from_numpy(v)
                                             for n, v in corrections.items()}
    if positions is not None:
        per_device = sum(v.nbytes for v in global_params.values())
        size = max(1, _setup.slice_bytes // max(per_device, 1))
        full = [full_steps(int(_sizes[j.device]), _setup.local) for j in jobs]
        costs = np.array([f if j.max_steps is None else min(f, j.max_steps)
                          for j, f in zip(jobs, full, strict=True)])
        order = np.argsort(-costs, kind="stable")
        steps = np.zeros(len(jobs), dtype=np.int64)
        examples = np.zeros(len(jobs), dtype=np.int64)
        loss = np.zeros(len(jobs), dtype=np.float64)
        for lo in range(0, len(jobs), size):
            part = order[lo:lo + size]
            result = _trainer.train(
                params, [jobs[i] for i in part],
                None if corr is None else {n: c[part] for n, c in corr.items()})
            rows = torch.tensor([positions[i] for i in part], dtype=torch.int64)
            for name, weights in result.params.items():
                _out[name].index_copy_(0, rows, weights)
            steps[part], examples[part], loss[part] = (result.steps, result.num_examples,
                                                       result.loss)
        return CohortResult(params={}, steps=steps, num_examples=examples, loss=loss)
    result = _trainer.train(params, jobs, corr)
    return CohortResult(params={n: p.numpy() for n, p in result.params.items()},  # type: ignore[misc]
                        steps=result.steps, num_examples=result.num_examples,
                        loss=result.loss)


class ProcessCohortTrainer:
    """``processes`` worker processes training the cohort with the ``kind`` engine (as
    :func:`simulations.cohort.make_trainer` builds it, ``threads`` torch threads each, after
    registering ``apps``: spawned workers start without the parent's registrations). Use
    as a context manager, or call :meth:`shutdown`; :meth:`from_config` takes a simulation's
    settings.

    Devices' weights come back through shared memory for cohorts of up to ``capacity``
    devices (pickling them back cost ~100 ms a round for 100 devices of 54k parameters on
    the development machine); larger cohorts are pickled. The returned ``params`` are then
    views of the shared rows, valid until the next :meth:`train` (every caller aggregates
    a round before training the next); copy them to keep them longer.

    The constructor returns once every worker has started and trained one step (within
    ``start_timeout_s`` seconds). A worker trains at most ``slice_bytes`` of its devices'
    weights at once (the default bounds a worker's own copy of a 1.07M-parameter MLP's
    cohort at 15 devices while a 54k-parameter MLP's share, 300 devices, stays whole, so
    its lock-step groups do too).

    Raises:
        ValueError: ``processes`` below 2.
    """

    def __init__(self, table: DeviceTable, processes: int, *, kind: EngineKind,
                 model: ModelSpec, local: LocalTraining, algorithm: AlgorithmConfig,
                 threads: int = 1, capacity: int = 0, apps: tuple[str, ...] = (),
                 start_timeout_s: float = 300.0, slice_bytes: int = 64 << 20) -> None:
        if processes < 2:
            raise ValueError(f"processes must be at least 2, got {processes}")
        import torch.multiprocessing as tmp

        try:
            table.share_memory()
            self._out: dict[str, torch.Tensor] = {
                # empty: untouched pages cost nothing until the workers write their rows
                n: torch.empty((capacity, *v.shape), dtype=torch.from_numpy(v).dtype
                               ).share_memory_()  # type: ignore[no-untyped-call]
                for n, v in initial_state(model, 0).items()} if capacity else {}
        except (RuntimeError, OSError) as exc:
            raise SimulationError(f"cannot place the data and the cohort's weights in shared "
                                  f"memory for worker processes: {exc}") from exc
        self._sizes = table.sizes
        self._local = local
        self._processes = processes
        self._overhead = 0.0 if kind is EngineKind.LOOP else LOCK_STEP_OVERHEAD
        self._capacity = capacity
        setup = _Setup(kind, model, local, algorithm, threads, apps, slice_bytes)
        context = tmp.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=processes, mp_context=context,
            initializer=_start, initargs=(setup, table, self._out,
                                          context.Barrier(processes)))
        initial = initial_state(model, 0)
        try:
            warm = [self._pool.submit(_warm, initial, start_timeout_s)
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
        with room in shared memory for the round's admitted devices."""
        return cls(table, config.engine.processes, kind=config.engine.kind,
                   model=config.model, local=config.local, algorithm=config.algorithm,
                   threads=config.engine.threads, capacity=config.selection.admitted,
                   apps=config.apps)

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        full = [full_steps(int(self._sizes[j.device]), self._local) for j in jobs]
        costs = [f if j.max_steps is None else min(f, j.max_steps)
                 for j, f in zip(jobs, full, strict=True)]
        groups = [g for g in split_jobs(jobs, costs, self._processes,
                                        lock_step_overhead=self._overhead) if g]
        params = {n: p.detach().numpy() for n, p in global_params.items()}
        shared = len(jobs) <= self._capacity
        try:
            futures = [self._pool.submit(
                _train, params, [jobs[i] for i in group],
                None if corrections is None else {n: c[group].numpy()
                                                  for n, c in corrections.items()},
                group if shared else None)
                for group in groups]
            # Every worker finishes (or fails) before anything is read: a failed worker must
            # not leave another still writing into the shared rows while the caller goes on.
            concurrent.futures.wait(futures)
            parts = [f.result() for f in futures]
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise SimulationError(f"a simulation worker process died: {exc} (too little "
                                  "shared memory in /dev/shm for the cohort's weights, or "
                                  "out of memory?)") from exc
        if not shared:
            return merge_results(groups, parts, global_params)
        order = np.argsort(np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]),
                           kind="stable")
        return CohortResult(
            params={n: self._out[n][:len(jobs)] for n in global_params},
            steps=np.concatenate([p.steps for p in parts])[order],
            num_examples=np.concatenate([p.num_examples for p in parts])[order],
            loss=np.concatenate([p.loss for p in parts])[order])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ProcessCohortTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
