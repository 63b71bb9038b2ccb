"""A round's work that is not I/O runs off the event loop: folding each clear upload into
the aggregate, the release, the server optimizer step, the model file and the server-side
evaluation are CPU and torch work (for a 10M-parameter model, tens of milliseconds per
upload and per release), so no RPC ever waits on them. The database is written only on the
loop, when the round machine collects the finished commit (:meth:`coordinator.rounds.
round_machine.RoundMachine.collect_commits`).

Two workers, each one thread in a server:

* the aggregation worker (:class:`BackgroundAggregator` over a ``concurrent.futures``
  executor): each accepted upload's file is linked aside on the loop (microseconds), and
  the worker folds it in, in arrival order;
* the commit worker (:class:`CommitWorker`): :func:`run_release` waits for the round's
  uploads to be folded in, releases the aggregate, then commits it (:func:`run_commit`).

``InlineCommits`` and :class:`InlineExecutor` run the work at once (unit tests,
deterministic); ``ThreadCommits`` and ``ThreadPoolExecutor(1)`` on one thread each (the
server). One thread each: commits of one task are ordered anyway (a task has at most one
commit in flight), uploads of a round are folded in one by one, and numpy and torch release
the GIL for the arithmetic.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from coordinator.rounds.aggregators import Aggregate, Aggregator, ReleaseRefused
from coordinator.rounds.evaluation import ServerEvaluator
from coordinator.rounds.models import ModelRepository
from coordinator.rounds.state import LoadedModel
from coordinator.storage.records import ModelVersionRecord
from core.aggregation.bounds import model_problem
from core.aggregation.server_optimizers import apply_server_optimizer
from core.errors import CoreError
from core.sampling import CohortDraw
from core.secagg.messages import RingVector
from core.tensors import from_raw_bytes
from core.types import TaskSpec

log = logging.getLogger(__name__)

T = TypeVar("T")


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
    #: What the round released (its metrics, its DP release); None when the release was
    #: refused or failed (then ``error`` says why).
    aggregate: Aggregate | None = None


@dataclass(frozen=True)
class ReleaseJob:
    """A round to release and commit: its aggregator (no upload is added any more: the round
    is AGGREGATING), the draw its selection made (the accountant's input under DP), and
    what the commit needs. ``evaluation``: an evaluation task's round (nothing trained)."""

    task_id: str
    spec: TaskSpec
    base: LoadedModel
    aggregator: Aggregator
    draw: CohortDraw | None
    round_number: int
    now: float
    evaluation: bool = False


def run_release(job: ReleaseJob, models: ModelRepository,
                evaluator: ServerEvaluator) -> CommitOutcome:
    """The round's one release call (after every upload is folded in), then its commit
    (:func:`run_commit`, or :func:`run_evaluation_commit` for an evaluation round). A
    refused release (:class:`ReleaseRefused`) or one that fails gives no model and the
    reason, so the round fails with it: nothing committed, nothing accounted."""
    try:
        aggregate = job.aggregator.release(job.draw)
    except ReleaseRefused as exc:
        return CommitOutcome(None, str(exc))
    except Exception as exc:  # noqa: BLE001 - a round must never stay open half-done
        log.exception("releasing round %d of task %s failed", job.round_number, job.task_id)
        return CommitOutcome(None, f"aggregation failed: {type(exc).__name__}: {exc}")
    commit = run_evaluation_commit if job.evaluation else run_commit
    outcome = commit(CommitJob(job.task_id, job.spec, job.base, aggregate.mean,
                               job.round_number, job.now), models, evaluator)
    return replace(outcome, aggregate=aggregate)


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
        # Views of the mean, which is this commit's own: no copy (there were three, via
        # bytes: 400 MB each for a 100M-parameter model).
        delta = from_raw_bytes(np.ascontiguousarray(job.mean, dtype="<f4").data, base.infos,
                               copy=False)
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


class InlineExecutor(Executor):
    """An executor that runs each call at once, on the caller's thread (unit tests)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on it
            future.set_exception(exc)
        return future


def aggregation_executor(*, background: bool) -> Executor:
    """The aggregation worker: one thread (``background``), else in line."""
    if background:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedcoord-aggregate")
    return InlineExecutor()


class BackgroundAggregator:
    """An :class:`~coordinator.rounds.aggregators.Aggregator` whose clear uploads are folded
    in by ``executor``, off the event loop, in the order they were accepted.

    :meth:`add_upload` (on the loop) links the checked spool file aside (the caller removes
    the spool file as soon as it returns) and queues the fold; the worker removes the link
    after it. :meth:`release` waits until every queued fold is done, so call it off the
    loop (:func:`run_release` on the commit worker) and only once no upload is added any
    more. A fold that fails makes the release refuse the round, with the reason (the update
    was already recorded as reported, so the aggregate would silently miss it).
    ``check_upload`` and ``add_masked`` (secure aggregation's vectors arrive in memory) run
    on the caller's thread, as before.

    Thread-safety: the event loop calls :meth:`check_upload`, :meth:`add_upload` and
    :meth:`add_masked`; the wrapped aggregator's ``add_upload`` and ``release`` run on the
    worker threads only, one at a time."""

    def __init__(self, inner: Aggregator, executor: Executor) -> None:
        self._inner = inner
        self._executor = executor
        self.metrics_policy = inner.metrics_policy
        self._folds: list[Future[None]] = []

    @property
    def queued(self) -> int:
        """Uploads accepted whose fold has not finished yet."""
        return sum(not f.done() for f in self._folds)

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return self._inner.check_upload(metrics)

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        held = _hold(path)
        self._folds.append(self._executor.submit(
            self._fold, held, num_examples, dict(metrics), scale))

    def _fold(self, held: Path, num_examples: int, metrics: dict[str, float],
              scale: float) -> None:
        try:
            self._inner.add_upload(held, num_examples, metrics, scale=scale)
        finally:
            held.unlink(missing_ok=True)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        self._inner.add_masked(device, vector, clipped)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Waits for the queued folds, then the wrapped aggregator's release.

        Raises:
            ReleaseRefused: a fold failed (its reason), or the wrapped release refused.
        """
        for fold in self._folds:
            exc = fold.exception()
            if exc is not None:
                raise ReleaseRefused(f"aggregation failed: an accepted update could not be "
                                     f"folded in ({type(exc).__name__}: {exc})")
        return self._inner.release(draw)


def _hold(path: Path) -> Path:
    """A second name for the spool file ``path`` (a hard link: no copy), in its directory;
    a copy where the file system has no hard links."""
    held = path.with_name(path.name + ".fold")
    try:
        os.link(path, held)
    except OSError:
        shutil.copyfile(path, held)
    return held
