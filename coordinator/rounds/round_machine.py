"""The round state machine of every running task: open, select, train, release, commit,
fail and redo. Each transition is written to the database before anything depends on it.

Round lifecycle::

    SELECTING --window closes, cohort drawn--> TRAINING --goal reached--> AGGREGATING
        |                                         |  deadline, >= min_reports ^
        +------------- deadline, < min_reports ---+--> FAILED (reason)       |
                                                                 COMMITTED <-+

SELECTING: eligible devices that check in during the selection window are offered to the
:class:`~coordinator.rounds.selection.Selector`; when it closes, the cohort is drawn (under DP
the draw is checked against the budget first). Without DP a round still short of its target
admits later check-ins as they come; TRAINING ends when ``clients_per_round`` updates were
accepted (over-selected stragglers are then late). Under DP the goal is every drawn device
(no cut by report order). Either way a deadline with at least ``min_reports`` reports
aggregates, and a round whose admitted devices have all reported or errored ends early.
AGGREGATING: the aggregator's one release call and the commit run off the event loop
(:mod:`coordinator.rounds.commits`; clear uploads were folded in there too, as they came) and
land on the next :meth:`RoundMachine.collect_commits`; a refused release fails the round.
A failed round is redone as a new attempt of the same round number. After a crash, open
rounds are failed at start and redone: an aggregate never mixes two attempts, because the
aggregator lives only in memory and only one attempt per round is ever open.

An asynchronous (FedBuff) task has no SELECTING and no round deadline: its round opens in
TRAINING, devices are seated as they check in, and the round is released when its buffer is
full; the policy is :class:`~coordinator.rounds.asynchronous.FedBuff`.

Not thread-safe: the service's event loop calls it. Time is passed in (from the injected
clock); randomness from the injected ``random.Random``.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from coordinator.rounds.aggregators import Aggregator, begin_aggregation, metrics_policy_for
from coordinator.rounds.asynchronous import FedBuff
from coordinator.rounds.commits import (
    BackgroundAggregator,
    CommitOutcome,
    CommitWorker,
    ReleaseJob,
    aggregation_executor,
    run_release,
)
from coordinator.rounds.evaluation import ServerEvaluator
from coordinator.rounds.evaluation_aggregators import begin_evaluation
from coordinator.rounds.evaluation_tasks import experiment_look
from coordinator.rounds.models import ModelRepository
from coordinator.rounds.secure import SecureRound
from coordinator.rounds.selection import Selector
from coordinator.rounds.shards import ShardedAggregator, ShardPool, ShardRound, shard_mode
from coordinator.rounds.state import OpenRound, RunningTask, Seat, hash_token
from coordinator.rounds.task_setup import selection_policy
from coordinator.settings import CoordinatorSettings
from coordinator.storage import Store
from core.experiments.versions import stop_reason
from core.privacy.noise import NoiseSource
from core.protocol import MetricsPolicy, SecAggPlan
from core.sampling import CohortDraw
from core.secagg.messages import Stage
from core.secagg.server import SecAggAborted
from core.shards import RoundKey
from core.types import ParticipantState, RoundState, TaskState

log = logging.getLogger(__name__)


@dataclass
class _PendingCommit:
    task: RunningTask
    round: OpenRound
    released_at: float
    future: Future[CommitOutcome]


class RoundMachine:
    def __init__(self, store: Store, models: ModelRepository, evaluator: ServerEvaluator,
                 running: dict[str, RunningTask], *, rng: random.Random,
                 settings: CoordinatorSettings, noise: NoiseSource, commits: CommitWorker,
                 progress: Callable[[], None], shards: ShardPool | None = None) -> None:
        """``running``: the loaded tasks by id (shared with :class:`~coordinator.rounds.
        tasks.Tasks`; a task leaves it when it ends). ``progress()`` is called whenever a
        secure-aggregation stage closes or a round ends."""
        self._store = store
        self._models = models
        self._evaluator = evaluator
        self._running = running
        self._rng = rng
        self._settings = settings
        self._noise = noise
        self._commits = commits
        self._progress = progress
        self._pending: list[_PendingCommit] = []
        self._shards = shards
        # Folds clear uploads into their round's aggregate, off the loop in a server.
        self._aggregation = aggregation_executor(background=settings.commit_in_background)

    # ------------------------------------------------------------------ driving

    def advance(self, task: RunningTask, now: float) -> None:
        """Takes every transition that is due for ``task`` at ``now``."""
        rnd = task.round
        if rnd is None or rnd.state is RoundState.AGGREGATING:
            return
        if task.declines.total and self._fail_if_no_device_can_run(task, rnd, now):
            return
        if task.fedbuff is not None:
            self._advance_async(task, rnd, task.fedbuff, now)
            return
        spec = task.spec
        if rnd.state is RoundState.SELECTING and rnd.selector.due(now):
            if not self._close_selection(task, rnd, now):
                return
        if rnd.state is RoundState.SELECTING and len(rnd.seats) >= spec.selection_target:
            self.start_training(rnd, now)
        if rnd.secure is not None:
            self._advance_secure(task, rnd, rnd.secure, now)
            return
        if rnd.shards is not None:
            self._take_shard_reports(rnd, rnd.shards, now)
        reports = len(rnd.reported)
        pending = len(rnd.seats) - reports - len(rnd.errored)
        if reports >= rnd.goal:
            self._release(task, rnd, now)
        elif now >= rnd.deadline or (
            rnd.state is RoundState.TRAINING and pending <= 0 and not rnd.uploading
        ):
            if reports >= spec.min_reports:
                self._release(task, rnd, now)
            else:
                why = "deadline passed" if now >= rnd.deadline else "no admitted device left"
                self.fail_round(
                    task, rnd, now,
                    f"{why} with {reports} of the {spec.min_reports} reports needed "
                    f"({len(rnd.seats)} admitted, {len(rnd.errored)} errored)",
                )

    def tick(self, now: float) -> None:
        """Lands finished commits and drives every task's deadlines and windows."""
        self.collect_commits(now)
        for task in list(self._running.values()):
            self.advance(task, now)

    # ------------------------------------------------------------------ transitions

    def open_next_round(self, task: RunningTask, now: float,
                        carried: OpenRound | None = None) -> None:
        """Opens the task's next round, or ends the task (all rounds done, or the budget
        would be passed by one more round with the planned draw). ``carried``: the round of
        an asynchronous task's version just committed, whose seats in flight (and their
        uploads in progress) go on to the new round."""
        record = self._store.get_task(task.task_id)
        if record.state is not TaskState.RUNNING:
            return
        if record.rounds_committed >= task.spec.rounds:
            self._store.set_task_state(task.task_id, TaskState.COMPLETED)
            self._running.pop(task.task_id, None)
            log.info("task %s completed after %d rounds", task.task_id, record.rounds_committed)
            return
        if task.privacy is not None:
            exceeds, after = task.privacy.next_round_exceeds_budget()
            if exceeds:
                reason = (f"privacy budget exhausted after {record.rounds_committed} rounds: "
                          f"epsilon is {task.privacy.epsilon():.4g} and one more round would "
                          f"reach {after:.4g} > {task.privacy.budget:.4g} "
                          f"(delta {task.privacy.delta:g})")
                self._store.set_task_state(task.task_id, TaskState.BUDGET_EXHAUSTED, reason)
                self._running.pop(task.task_id, None)
                log.info("task %s: %s", task.task_id, reason)
                return
        spec = task.spec
        deadline = now + spec.round_deadline_s
        rec = self._store.open_round(
            task.task_id, record.rounds_committed + 1, spec.clients_per_round, now, deadline
        )
        secure = None
        if task.secagg is not None:
            assert spec.secure_aggregation is not None
            context = f"fedcoord/v1/{task.task_id}/round/{rec.round_number}/{rec.round_id}"
            plan = SecAggPlan(task.secagg, context.encode(),
                              spec.secure_aggregation.phase_timeout_s)
            secure = SecureRound.open(plan, goal=spec.clients_per_round)
        require_secure_noise = not self._settings.allow_seeded_noise
        sharded = self._shard_round(task, rec.round_id)
        aggregator: Aggregator
        if sharded is not None:
            assert self._shards is not None
            aggregator = ShardedAggregator(
                self._shards, sharded, min_reports=spec.min_reports, privacy=task.privacy,
                noise=self._noise, require_secure_noise=require_secure_noise,
                withhold_metrics=metrics_policy_for(spec) is MetricsPolicy.WITHHELD,
                weight_cap=spec.robustness.weight_cap)
        elif task.evaluation is None:
            aggregator = begin_aggregation(
                spec, task.model.size, privacy=task.privacy, secure=secure, noise=self._noise,
                require_secure_noise=require_secure_noise)
        else:
            aggregator = begin_evaluation(
                task.evaluation, privacy=task.privacy, secure=secure, noise=self._noise,
                require_secure_noise=require_secure_noise)
        task.round = OpenRound(
            round_id=rec.round_id,
            round_number=rec.round_number,
            state=RoundState.SELECTING,
            started=now,
            deadline=deadline,
            selector=Selector(selection_policy(spec), opened=now,
                              window_s=spec.selection_window_s, last_close=deadline,
                              rng=self._rng),
            aggregator=BackgroundAggregator(aggregator, self._aggregation),
            goal=spec.clients_per_round,
            secure=secure,
            shards=sharded,
        )
        if sharded is not None:
            assert self._shards is not None
            self._shards.watch(sharded.key)
        if task.fedbuff is not None:
            self._open_async(task, task.round, task.fedbuff, now, carried)

    def admit(self, task: RunningTask, rnd: OpenRound, devices: list[str], now: float
              ) -> list[Seat]:
        """Seats ``devices`` (recorded before any of them hears of it)."""
        seats = []
        deadline = task.fedbuff.seat_deadline(now) if task.fedbuff is not None else math.inf
        for _ in devices:
            token = secrets.token_urlsafe(18)
            evaluate = self._rng.random() < task.spec.evaluation.fraction
            seats.append(Seat(hash_token(token), token, evaluate, round_number=rnd.round_number,
                              version=task.model.version, deadline=deadline))
        self._store.add_participants(
            rnd.round_id, [(d, s.token_hash) for d, s in zip(devices, seats, strict=True)], now
        )
        for d, s in zip(devices, seats, strict=True):
            rnd.seats[d] = s
        if rnd.shards is not None:
            assert self._shards is not None
            healthy = self._shards.healthy()
            for d, s in zip(devices, seats, strict=True):
                s.shard = rnd.shards.assign(d, healthy)
        return seats

    def _shard_round(self, task: RunningTask, round_id: int) -> ShardRound | None:
        """A new attempt's shard assignment, when the coordinator has shards and the task
        folds its uploads by a sum (:func:`~coordinator.rounds.shards.shard_mode`)."""
        if self._shards is None:
            return None
        mode = shard_mode(task.spec, task.privacy, asynchronous=task.fedbuff is not None,
                          evaluation=task.evaluation is not None)
        if mode is None:
            return None
        return ShardRound(RoundKey(task.task_id, round_id), mode, task.model.size,
                          len(self._shards.addresses))

    def _take_shard_reports(self, rnd: OpenRound, shards: ShardRound, now: float) -> None:
        """Counts the updates the shards accepted (as of their last poll) as the round's
        reports, each recorded before it counts."""
        assert self._shards is not None
        accepted = shards.accepted(self._shards.reported(shards.key)) - rnd.reported
        for device in sorted(accepted):
            self._store.set_participant_state(rnd.round_id, device, ParticipantState.REPORTED,
                                              now=now)
            rnd.errored.discard(device)  # an error reported after its update changes nothing
            rnd.reported.add(device)

    def start_training(self, rnd: OpenRound, now: float) -> None:
        if rnd.state is RoundState.SELECTING:
            self._store.set_round_state(rnd.round_id, RoundState.TRAINING, now=now)
            rnd.state = RoundState.TRAINING

    def fail_round(self, task: RunningTask, rnd: OpenRound, now: float, reason: str) -> None:
        log.warning("task %s round %d failed: %s", task.task_id, rnd.round_number, reason)
        self._store.set_round_state(rnd.round_id, RoundState.FAILED, now=now,
                                    failure_reason=reason)
        self._forget_shards(rnd)
        task.round = None
        task.closed_seats = rnd.seats
        task.failed_attempts += 1
        self._progress()
        if task.failed_attempts >= self._settings.max_failed_attempts:
            self._store.set_task_state(
                task.task_id, TaskState.FAILED,
                f"{task.failed_attempts} round attempts in a row failed; last: {reason}",
            )
            self._running.pop(task.task_id, None)
            return
        self.open_next_round(task, now)

    def fail_task(self, task: RunningTask, rnd: OpenRound | None, now: float,
                  reason: str) -> None:
        """Ends the task as FAILED with ``reason`` (its open round fails with it)."""
        log.warning("task %s failed: %s", task.task_id, reason)
        if rnd is not None:
            self._store.set_round_state(rnd.round_id, RoundState.FAILED, now=now,
                                        failure_reason=reason)
            self._forget_shards(rnd)
            task.closed_seats = rnd.seats
        task.round = None
        self._store.set_task_state(task.task_id, TaskState.FAILED, reason)
        self._running.pop(task.task_id, None)
        self._progress()

    def _forget_shards(self, rnd: OpenRound) -> None:
        if rnd.shards is not None:
            assert self._shards is not None
            self._shards.forget(rnd.shards.key)

    def _fail_if_no_device_can_run(self, task: RunningTask, rnd: OpenRound, now: float
                                   ) -> bool:
        """Fails the task when its declines say no device can run it (the rule of
        :meth:`coordinator.rounds.declines.Declines.verdict`); True if it did."""
        pending = len(rnd.seats) - len(rnd.reported) - len(rnd.errored)
        why = task.declines.verdict(any_accepted=task.any_accepted or bool(rnd.reported),
                                    any_pending=pending > 0 or bool(rnd.uploading))
        if why is None:
            return False
        self.fail_task(task, rnd, now, why)
        return True

    def _close_selection(self, task: RunningTask, rnd: OpenRound, now: float) -> bool:
        """Draws the cohort when the window closes; False when the round ended (failed)
        instead. Under DP the draw is checked against the budget before anyone trains, and
        the cohort is final: training starts with whoever was drawn."""
        chosen = rnd.selector.close(now)
        if chosen is None:
            return True  # too few devices seen; the window stays open a little longer
        draw = rnd.selector.draw
        assert draw is not None
        if task.privacy is not None:
            exceeds, after = task.privacy.draw_exceeds_budget(draw)
            if exceeds:
                self.fail_round(
                    task, rnd, now,
                    f"only {draw.eligible} eligible devices checked in: a cohort of "
                    f"{draw.cohort} drawn from them (q = {draw.sampling_rate:.4g}) would take "
                    f"epsilon to {after:.4g}, past the budget {task.privacy.budget:.4g}")
                return False
            if draw.cohort < task.spec.min_reports:
                self.fail_round(
                    task, rnd, now,
                    f"selection closed with {draw.eligible} eligible devices; a cohort of "
                    f"{draw.cohort} cannot reach min_reports {task.spec.min_reports}")
                return False
        if chosen:
            self.admit(task, rnd, chosen, now)
        if task.privacy is not None:
            rnd.goal = len(rnd.seats)
            self.start_training(rnd, now)
            if rnd.secure is not None:
                rnd.secure.goal = len(rnd.seats)
        return True

    def _open_async(self, task: RunningTask, rnd: OpenRound, fedbuff: FedBuff, now: float,
                    carried: OpenRound | None) -> None:
        """An asynchronous round trains from the start and has no deadline of its own (its
        seats have theirs); the seats in flight of the version just committed join it."""
        self.start_training(rnd, now)
        rnd.deadline = math.inf
        rnd.goal = fedbuff.buffer
        if carried is None:
            return
        seats = fedbuff.carried_seats(carried)
        if seats:
            # Recorded, so that after a restart these devices are told their round closed.
            self._store.add_participants(
                rnd.round_id, [(d, s.token_hash) for d, s in seats.items()], now)
        rnd.seats.update(seats)
        rnd.uploading.update({d: u for d, u in carried.uploading.items() if d in seats})

    def _advance_async(self, task: RunningTask, rnd: OpenRound, fedbuff: FedBuff,
                       now: float) -> None:
        """Frees the seats that expired and releases a full buffer."""
        if rnd.state is not RoundState.TRAINING:
            return
        for device in fedbuff.expired(rnd, now):
            log.info("task %s: the seat of device %s expired without an update",
                     task.task_id, device)
            self._store.set_participant_state(rnd.round_id, device, ParticipantState.ERRORED,
                                              now=now)
            rnd.errored.add(device)
        if fedbuff.buffer_full(rnd):
            self._release(task, rnd, now)

    def _advance_secure(self, task: RunningTask, rnd: OpenRound, secure: SecureRound,
                        now: float) -> None:
        spec = task.spec
        pending = len(rnd.seats) - secure.server.advertised - len(rnd.errored)
        if rnd.state is not RoundState.TRAINING:
            pending = max(pending, 1)  # more devices may still be admitted
        try:
            while secure.due(now, rnd.deadline, pending):
                if secure.stage is Stage.ADVERTISE and (
                    secure.server.advertised < spec.min_reports
                ):
                    self.fail_round(
                        task, rnd, now,
                        f"deadline passed with {secure.server.advertised} of the "
                        f"{spec.min_reports} key advertisements needed for secure aggregation "
                        f"({len(rnd.seats)} admitted, {len(rnd.errored)} errored)",
                    )
                    return
                stage = secure.stage
                if stage is Stage.ADVERTISE:
                    self.start_training(rnd, now)  # the cohort is fixed from here on
                secure.close_stage(now)
                self._progress()
                if stage is Stage.MASKED_INPUT and len(rnd.reported) < spec.min_reports:
                    raise secure.server.abort(f"only {len(rnd.reported)} masked inputs "
                                              f"arrived; min_reports is {spec.min_reports}")
                if secure.result is not None:
                    self._release(task, rnd, now)
                    return
        except SecAggAborted as exc:
            self.fail_round(task, rnd, now, f"secure aggregation aborted: {exc}")

    # ------------------------------------------------------------------ release and commit

    def _release(self, task: RunningTask, rnd: OpenRound, now: float) -> None:
        """Closes the round to uploads (AGGREGATING) and hands its release and commit to the
        worker (:func:`~coordinator.rounds.commits.run_release`); a refused release fails
        the round when it is collected (nothing committed, nothing accounted)."""
        self.start_training(rnd, now)
        self._store.set_round_state(rnd.round_id, RoundState.AGGREGATING, now=now)
        rnd.state = RoundState.AGGREGATING
        task.committing = True
        job = ReleaseJob(task.task_id, task.spec, task.model, rnd.aggregator,
                         _accounted_draw(task, rnd), rnd.round_number, now,
                         evaluation=task.evaluation is not None)
        future = self._commits.submit(partial(run_release, job, self._models, self._evaluator))
        self._pending.append(_PendingCommit(task, rnd, now, future))
        self.collect_commits(now)

    def collect_commits(self, now: float) -> None:
        """Records every commit the worker finished: the round becomes COMMITTED (a DP
        release counts towards epsilon from then on) and the next round opens."""
        done = [p for p in self._pending if p.future.done()]
        if not done:
            return
        self._pending = [p for p in self._pending if not p.future.done()]
        for pending in done:
            self._finish_commit(pending, now)

    def _finish_commit(self, pending: _PendingCommit, now: float) -> None:
        task, rnd = pending.task, pending.round
        task.committing = False
        if self._running.get(task.task_id) is not task or task.round is not rnd:
            return  # cancelled meanwhile: the round was failed, nothing is recorded
        try:
            outcome = pending.future.result()
        except Exception as exc:  # noqa: BLE001 - the round fails with the reason
            log.exception("committing round %d of task %s failed", rnd.round_number,
                          task.task_id)
            outcome = CommitOutcome(None, f"commit failed: {type(exc).__name__}: {exc}")
        aggregate = outcome.aggregate
        if outcome.model is None or aggregate is None:
            self.fail_round(task, rnd, now, outcome.error)
            return
        self._forget_shards(rnd)
        if aggregate.reported is not None:
            # Updates a shard took after its last poll are in the aggregate: recorded and
            # counted as reports (a device counted once under DP stays counted).
            for device in sorted(aggregate.reported - rnd.reported):
                self._store.set_participant_state(rnd.round_id, device,
                                                  ParticipantState.REPORTED, now=now)
                rnd.reported.add(device)
        metrics = _finite(task.task_id, {
            "reports": float(len(rnd.reported)),
            "admitted": float(len(rnd.seats)),
            "round_seconds": pending.released_at - rnd.started,
            # Release to recorded commit: the last uploads' folding, the release, the server
            # optimizer, the model file, server-side evaluation and the wait for the next
            # tick (at most TICK_SECONDS).
            "commit_seconds": now - pending.released_at,
            **aggregate.metrics,
            **(task.fedbuff.metrics(rnd) if task.fedbuff is not None else {}),
            **outcome.eval_metrics,
        })
        look = experiment_look(task.spec, [
            r.metrics for r in sorted(self._store.list_rounds(task.task_id),
                                      key=lambda r: r.round_number)
            if r.state is RoundState.COMMITTED and r.round_number < rnd.round_number], metrics)
        if look is not None:
            metrics.update(look.metrics)
        self._store.commit_round(rnd.round_id, outcome.model.record, metrics,
                                 pending.released_at)
        if aggregate.release is not None:
            assert task.privacy is not None
            task.privacy.committed(aggregate.release)
        task.model = outcome.model
        task.round = None
        if task.counts_devices_once:
            task.counted_devices |= rnd.reported
        task.closed_seats = rnd.seats
        task.failed_attempts = 0
        task.any_accepted = True
        self._progress()
        log.info("task %s committed round %d (model v%d, %d reports)",
                 task.task_id, rnd.round_number, outcome.model.version, len(rnd.reported))
        if look is not None and look.decision.stops:
            # The decision and its reason are the task's end: stored before anything else.
            reason = stop_reason(look.decision)
            self._store.set_task_state(task.task_id, TaskState.COMPLETED, reason)
            self._running.pop(task.task_id, None)
            log.info("task %s: %s", task.task_id, reason)
            return
        self.open_next_round(task, now, carried=rnd)

    def close(self) -> None:
        self._commits.close()
        self._aggregation.shutdown(wait=True)


def _accounted_draw(task: RunningTask, rnd: OpenRound) -> CohortDraw | None:
    """What the accountant is told a round's selection did: the draw its window made; an
    asynchronous task samples nobody, so under DP each version counts as a draw of the whole
    population (:func:`core.privacy.task.planned_draw`)."""
    if task.fedbuff is not None and task.privacy is not None:
        return task.privacy.planned_draw
    return rnd.selector.draw


def _finite(task_id: str, metrics: dict[str, float]) -> dict[str, float]:
    """The round metrics that may be stored: a non-finite one (JSON has no Infinity) is
    dropped with a warning. The inputs are bounded so that none should ever be."""
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        log.warning("task %s: round metrics %s are not finite; they are not stored",
                    task_id, ", ".join(bad))
    return {name: value for name, value in metrics.items() if name not in bad}
