"""Trials in worker processes: one trial per process at a time, ``parallel`` processes.

Processes, not threads: a simulated round is many small torch calls that each give up and
take back the GIL (see :mod:`simulations.process_backend`), and ``torch.set_num_threads``,
which every simulation sets from its ``simulation.engine.threads``, is global to a process.
Each worker therefore runs its trials with the task's own thread count (default 1), and a
study uses ``parallel x threads`` cores.

The conversation with a worker, over its pipe (pickled: the messages stay on this machine
and carry task-file data, never models)::

    parent -> worker   (job, metric) | None (exit)
    worker -> parent   ("round", number, round, value)   parent -> worker  stop? (bool)
    worker -> parent   ("done", TrialOutcome)

The parent answers each ``round`` message at once, so the pruner runs in the study's thread
and a worker waits only for its own answer. Workers start with ``spawn`` (no fork of a
process with torch threads) and keep the population they loaded for the next trial.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from collections.abc import Sequence
from typing import Any

from simulations.tuning.study import (
    RoundReport,
    TrialContext,
    TrialJob,
    TrialOutcome,
    TrialState,
    run_simulated_trial,
)


def _worker_main(conn: multiprocessing.connection.Connection, context: TrialContext) -> None:
    import torch

    from simulations.config import load_apps

    # Loading data and building models between trials: one thread, as the trials train
    # with their task's simulation.engine.threads (set by the simulation itself).
    torch.set_num_threads(1)
    load_apps(context.apps)
    while True:
        message = conn.recv()
        if message is None:
            return
        job, metric = message

        def report(number: int, round_number: int, value: float) -> bool:
            conn.send(("round", number, round_number, value))
            return bool(conn.recv())

        try:
            outcome = run_simulated_trial(job, context, report, metric=metric)
        except Exception as exc:  # a fault in a trial must not end the study
            outcome = TrialOutcome(job.number, TrialState.FAILED, None, 0,
                                   reason=f"{type(exc).__name__}: {exc}")
        conn.send(("done", outcome))


class ProcessTrials:
    """``parallel`` worker processes, each running one trial at a time. Not thread-safe;
    :meth:`close` stops the workers (a worker that died is replaced at the next wave)."""

    def __init__(self, parallel: int, context: TrialContext) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._context = TrialContext(context.source, context.base_dir, context.apps)
        self._workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        self.parallel = parallel

    def _ensure_workers(self, count: int) -> None:
        self._workers = [(p, c) for p, c in self._workers if p.is_alive()]
        while len(self._workers) < count:
            parent, child = self._ctx.Pipe()
            process = self._ctx.Process(target=_worker_main, args=(child, self._context),
                                        daemon=True, name="fedcoord-trial")
            process.start()
            child.close()
            self._workers.append((process, parent))

    def run_wave(self, jobs: Sequence[TrialJob], report: RoundReport,
                 *, metric: str) -> list[TrialOutcome]:
        if len(jobs) > self.parallel:
            raise ValueError(f"a wave of {len(jobs)} trials on {self.parallel} workers")
        self._ensure_workers(len(jobs))
        running: dict[multiprocessing.connection.Connection, tuple[Any, TrialJob]] = {}
        for (process, conn), job in zip(self._workers, jobs, strict=False):
            conn.send((job, metric))
            running[conn] = (process, job)
        outcomes: list[TrialOutcome] = []
        while running:
            for ready in multiprocessing.connection.wait(list(running)):
                assert isinstance(ready, multiprocessing.connection.Connection)
                process, job = running[ready]
                try:
                    message = ready.recv()
                except (EOFError, OSError):
                    process.join(timeout=5)
                    outcomes.append(TrialOutcome(
                        job.number, TrialState.FAILED, None, 0,
                        reason=f"its worker process exited (code {process.exitcode})"))
                    del running[ready]
                    continue
                if message[0] == "round":
                    _, number, round_number, value = message
                    ready.send(report(number, round_number, value))
                else:
                    outcomes.append(message[1])
                    del running[ready]
        return outcomes

    def close(self) -> None:
        for _, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process, conn in self._workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            conn.close()
        self._workers = []
