"""Committing a round's aggregate, off the event loop: the server optimizer step, the model
file and the server-side evaluation are CPU and torch work, so they run on a worker thread
and no RPC ever waits on them. The database is written only on the loop, when the round
machine collects the finished commit (:meth:`coordinator.rounds.round_machine.RoundMachine.
collect_commits`).

``InlineCommits`` runs the work at once (unit tests, deterministic); ``ThreadCommits`` on one
worker thread (the server). One thread: commits of one task are ordered anyway (a task has at
most one commit in flight) and torch's own threads do the parallel work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from coordinator.rounds.evaluation import ServerEvaluator
from coordinator.rounds.models import ModelRepository
from coordinator.rounds.state import LoadedModel
from coordinator.storage.records import ModelVersionRecord
from core.aggregation.bounds import model_problem
from core.aggregation.server_optimizers import apply_server_optimizer
from core.errors import CoreError
from core.tensors import from_raw_bytes
from core.types import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommitJob:
    """Everything the worker needs: it reads no shared state."""

    task_id: str
    spec: TaskSpec
    base: LoadedModel
    mean: np.ndarray
    round_number: int
    now: float


@dataclass(frozen=True)
class CommitOutcome:
    """The new model version (written, not yet recorded), or why there is none."""

    model: LoadedModel | None
    error: str = ""
    eval_metrics: dict[str, float] = field(default_factory=dict)


def run_commit(job: CommitJob, models: ModelRepository,
               evaluator: ServerEvaluator) -> CommitOutcome:
    """Applies the mean update with the server optimizer, refuses a model with non-finite
    or absurd parameters (above the task's ``robustness.max_abs_parameter``; nothing is
    written, the round fails with the reason), writes the version's files and evaluates it
    on the task's server data (an evaluation failure never undoes a commit). Touches files
    only; safe off the event loop."""
    base = job.base
    try:
        if not np.isfinite(job.mean).all():
            raise ValueError("the round's mean update holds non-finite values")
        delta = from_raw_bytes(job.mean.astype("<f4").tobytes(), base.infos)
        params, opt_state = apply_server_optimizer(
            base.params, delta, job.spec.server, base.optimizer_state)
        if not all(np.isfinite(v).all() for v in opt_state.values()):
            raise ValueError("the server optimizer's state became non-finite")
    except (ValueError, CoreError) as exc:
        return CommitOutcome(None, f"aggregation failed: {exc}")
    problem = model_problem(params, max_abs_parameter=job.spec.robustness.max_abs_parameter)
    if problem is not None:
        return CommitOutcome(None, f"the new model was not committed: {problem}")
    version = base.version + 1
    record: ModelVersionRecord = models.write(job.task_id, version, job.round_number, params,
                                              opt_state, job.now)
    metrics: dict[str, float] = {}
    if job.spec.evaluation.server_data:
        try:
            metrics = evaluator.evaluate(job.spec, params)
        except Exception:  # evaluation must never undo a commit
            log.exception("server-side evaluation of task %s failed", job.task_id)
    model = LoadedModel(version, params, base.infos, base.nbytes, record, opt_state)
    return CommitOutcome(model, eval_metrics=metrics)


def run_evaluation_commit(job: CommitJob, models: ModelRepository,
                          evaluator: ServerEvaluator) -> CommitOutcome:
    """An evaluation round's commit: nothing is trained or written; the next version is a
    record of the same bundle file (the store counts a committed round by its version), and
    the round's results are the release's metrics. Same signature as :func:`run_commit`."""
    return CommitOutcome(models.same_file(job.base, job.round_number, job.now))


class CommitWorker(Protocol):
    def submit(self, work: Callable[[], CommitOutcome]) -> Future[CommitOutcome]: ...

    def close(self) -> None: ...


class InlineCommits:
    """Runs each commit at once, on the caller's thread."""

    def submit(self, work: Callable[[], CommitOutcome]) -> Future[CommitOutcome]:
        future: Future[CommitOutcome] = Future()
        try:
            future.set_result(work())
        except Exception as exc:  # noqa: BLE001 - handed to the collector
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass


class ThreadCommits:
    """Runs commits on one worker thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcoord-commit")

    def submit(self, work: Callable[[], CommitOutcome]) -> Future[CommitOutcome]:
        return self._pool.submit(work)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
