"""Tasks: create, read, list, cancel, and load the running ones after a (re)start.

The running tasks live in one dict, shared with the round machine, which removes a task when
it ends. Everything a task record says is read from the store; queries change nothing.
Not thread-safe (the service's event loop), but for :meth:`Tasks.build`, the costly step
of a launch, which may run on another thread.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from coordinator.rounds.aggregators import metrics_policy_for
from coordinator.rounds.asynchronous import FedBuff
from coordinator.rounds.declines import Declines
from coordinator.rounds.errors import InvalidRequest, Late, NotFound, Unavailable, shown
from coordinator.rounds.evaluation import ServerEvaluator
from coordinator.rounds.evaluation_tasks import bundle_versions, evaluation_setup, resolve_bundle
from coordinator.rounds.launch import check_launch, initial_params
from coordinator.rounds.models import ModelRepository
from coordinator.rounds.round_machine import RoundMachine
from coordinator.rounds.schemas import ReportedSchemas, SchemaCount
from coordinator.rounds.state import LoadedModel, RunningTask, Seat
from coordinator.rounds.task_setup import check_supported, secagg_params, task_privacy
from coordinator.storage import Store
from coordinator.storage import errors as storage_errors
from coordinator.storage.records import ModelVersionRecord, RoundRecord, TaskRecord
from core.errors import CoreError, TensorFormatError
from core.privacy.task import PrivacyStatus, TaskPrivacy, status_of_records
from core.protocol import MetricsPolicy
from core.secagg.params import SecAggParams
from core.taskspec import spec_from_dict, spec_to_dict
from core.types import ParticipantState, RoundState, TaskKind, TaskSpec, TaskState

log = logging.getLogger(__name__)
#: The longest reason an operator may give when cancelling a task.
MAX_CANCEL_REASON = 500


@dataclass(frozen=True)
class TaskView:
    record: TaskRecord
    spec: TaskSpec
    current_round: RoundRecord | None
    #: Central / distributed DP: epsilon spent, the budget and the sampling performed.
    privacy: PrivacyStatus | None = None
    #: How devices' metrics leave them (what the task releases of them).
    metrics: MetricsPolicy = MetricsPolicy.CLEAR
    #: Devices that declined the task, by reason (since the coordinator started).
    declines: Mapping[str, int] = field(default_factory=dict)
    #: What was checked at launch, one line each (only in the answer to a launch).
    launch_checks: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskLaunch:
    """A task being launched, as :meth:`Tasks.launch` read it on the event loop: its spec
    (an evaluation task's resolved), the schemas its population reported, and for an
    evaluation task its bundle (``params``: the bundle's tensors; ``checked_params``: the
    versions' parameters its model is checked with), header ``metadata`` and launch
    ``lines``."""

    spec: TaskSpec
    schemas: Sequence[SchemaCount]
    window_s: float
    now: float
    params: dict[str, np.ndarray] | None = None
    checked_params: Mapping[str, np.ndarray] | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuiltTask:
    """A launched task's model built, checked and written (:meth:`Tasks.build`), before the
    task is stored and running."""

    task_id: str
    spec: TaskSpec
    record: ModelVersionRecord
    model: LoadedModel
    privacy: TaskPrivacy | None
    secagg: SecAggParams | None
    checks: tuple[str, ...]


class Tasks:
    def __init__(self, store: Store, models: ModelRepository, evaluator: ServerEvaluator,
                 machine: RoundMachine, running: dict[str, RunningTask],
                 schemas: ReportedSchemas) -> None:
        self._store = store
        self._models = models
        self._evaluator = evaluator
        self._machine = machine
        self._running = running
        self._schemas = schemas
        #: Every loaded task's declines, kept after it ends (a few reasons per task).
        self._declines: dict[str, Declines] = {}

    def create(self, spec: TaskSpec, now: float) -> TaskView:
        """Checks the spec and its model (:mod:`coordinator.rounds.launch`), writes model
        version 0 and the task, and opens round 1: :meth:`launch`, :meth:`build` and
        :meth:`register` in one go. The view's ``launch_checks`` say what was checked.

        Raises:
            InvalidRequest: the model cannot be built, does not fit its declared data, or the
                spec asks for what the coordinator cannot run (see
                :func:`~coordinator.rounds.task_setup.check_supported`).
            DataMismatch: the model or declared data does not fit the data the task's
                population reported.
        """
        return self.register(self.build(self.launch(spec, now)), now)

    def launch(self, spec: TaskSpec, now: float) -> TaskLaunch:
        """The first step of :meth:`create`, on the event loop: what a launch reads of the
        coordinator's state (an evaluation task's versions, packed into its bundle; the
        schemas the population reported). Raises as :meth:`create`."""
        if spec.kind is not TaskKind.EVALUATE:
            return TaskLaunch(spec, self._schemas.of(spec.population, now),
                              self._schemas.window_s, now)
        bundle = resolve_bundle(spec, self._store, self._models)
        return TaskLaunch(bundle.spec, self._schemas.of(bundle.spec.population, now),
                          self._schemas.window_s, now, bundle.params,
                          bundle_versions(bundle), bundle.metadata, (bundle.line,))

    def build(self, launch: TaskLaunch) -> BuiltTask:
        """The second step of :meth:`create`, thread-safe (it reads and writes no shared
        state but the model store's files): the model built and checked, version 0
        written. The costly part for a large model (a 100M-parameter model takes seconds to
        build and write), so the admin servicer runs it off the event loop. Raises as
        :meth:`create`."""
        spec = launch.spec
        params = launch.params
        checked: Mapping[str, np.ndarray]
        if params is None:
            params = checked = initial_params(spec)
            if spec.evaluation.server_data:
                self._evaluator.check(spec)
        else:
            checked = launch.checked_params if launch.checked_params is not None else params
        check_supported(spec)
        checks = [*check_launch(spec, checked, launch.schemas, window_s=launch.window_s),
                  *launch.lines]
        privacy = task_privacy(spec, [])
        secagg = secagg_params(spec, privacy)
        task_id = f"{_slug(spec.name)}-{secrets.token_hex(4)}"
        record, model = self._models.initial(task_id, params, launch.now, launch.metadata)
        return BuiltTask(task_id, spec, record, model, privacy, secagg, tuple(checks))

    def register(self, built: BuiltTask, now: float) -> TaskView:
        """The last step of :meth:`create`, on the event loop: the task stored and running,
        its first round open."""
        task_id, spec = built.task_id, built.spec
        self._store.create_task(task_id, json.dumps(spec_to_dict(spec), sort_keys=True),
                                built.record, now)
        task = RunningTask(task_id, spec, built.model, secagg=built.secagg,
                           privacy=built.privacy, declines=self._new_declines(task_id, spec),
                           fedbuff=FedBuff.for_spec(spec), evaluation=evaluation_setup(spec))
        self._running[task_id] = task
        self._machine.open_next_round(task, now)
        log.info("created task %s (%s); checked: %s", task_id, spec.name,
                 "; ".join(built.checks))
        return replace(self.view(task_id), launch_checks=built.checks)

    def recover(self, now: float) -> None:
        """Loads running tasks after a (re)start; open rounds from before are failed and
        redone, and their devices told "closed" rather than "not selected"."""
        interrupted = {
            rec.task_id: rec
            for rec in self._store.fail_open_rounds(
                "coordinator restarted while the round was open; the round is redone", now
            )
        }
        for record in self._store.list_tasks():
            if record.state is not TaskState.RUNNING:
                continue
            try:
                spec = self._spec(record)
            except Unavailable as exc:
                # A task stored by an older version that today's rules refuse (e.g. a DP task
                # without a budget) must not run on unchecked: it ends, with the reason.
                log.error("task %s cannot continue: %s", record.task_id, exc)
                self._store.set_task_state(record.task_id, TaskState.FAILED,
                                           f"its task file no longer validates: {exc}")
                continue
            latest = self._store.latest_model_version(record.task_id)
            model = self._models.load(latest)
            try:
                # An evaluation task's devices read the plan in its stored bundle: that is
                # the report layout, whatever today's code would derive from the spec.
                evaluation = evaluation_setup(spec, bundle_plan=self._models.stored_plan(
                    latest) if spec.kind is TaskKind.EVALUATE else None)
            except (TensorFormatError, ValueError) as exc:
                log.error("task %s cannot continue: %s", record.task_id, exc)
                self._store.set_task_state(record.task_id, TaskState.FAILED,
                                           f"its stored evaluation bundle is unusable: {exc}")
                continue
            privacy = task_privacy(spec, self._committed_metrics(record.task_id))
            task = RunningTask(record.task_id, spec, model, secagg=secagg_params(spec, privacy),
                               privacy=privacy,
                               declines=self._new_declines(record.task_id, spec),
                               any_accepted=record.rounds_committed > 0,
                               fedbuff=FedBuff.for_spec(spec),
                               evaluation=evaluation)
            if task.counts_devices_once:
                task.counted_devices = self._counted_devices(record.task_id)
            if record.task_id in interrupted:
                rec = interrupted[record.task_id]
                log.warning("round %d of task %s was open at restart; redoing it",
                            rec.round_number, record.task_id)
                task.closed_seats = {
                    p.device_id: Seat(p.token_hash, "", False)
                    for p in self._store.list_participants(rec.round_id)
                }
            self._running[record.task_id] = task
            self._machine.open_next_round(task, now)

    def _counted_devices(self, task_id: str) -> set[str]:
        """The devices whose reports are in the task's committed rounds."""
        return {p.device_id
                for r in self._store.list_rounds(task_id) if r.state is RoundState.COMMITTED
                for p in self._store.list_participants(r.round_id)
                if p.state is ParticipantState.REPORTED}

    def view(self, task_id: str) -> TaskView:
        record = self.record(task_id)
        spec = self._spec(record)
        declines = self._declines.get(task_id)
        return TaskView(record, spec, self._store.open_round_of(task_id),
                        privacy=self._privacy_status(task_id, spec),
                        metrics=metrics_policy_for(spec),
                        declines=dict(declines.by_reason) if declines is not None else {})

    def all(self) -> list[TaskView]:
        return [self.view(t.task_id) for t in self._store.list_tasks()]

    def rounds(self, task_id: str) -> list[RoundRecord]:
        self.record(task_id)
        return self._store.list_rounds(task_id)

    def cancel(self, task_id: str, now: float, reason: str = "") -> TaskView:
        """Ends the task as CANCELLED; ``reason`` (at most 500 printable characters; empty:
        "cancelled by an operator") is stored as the task's reason.

        Raises:
            InvalidRequest: a reason that is too long or not printable.
            NotFound, Late: no such task, or it already ended.
        """
        if len(reason) > MAX_CANCEL_REASON or not reason.isprintable():
            raise InvalidRequest(f"reason: at most {MAX_CANCEL_REASON} printable characters, "
                                 f"got {len(reason)}")
        record = self.record(task_id)
        if record.state.is_final:
            raise Late(f"task {task_id} is already {record.state.value}; nothing to cancel")
        task = self._running.pop(task_id, None)
        if task is not None and task.round is not None:
            self._store.set_round_state(task.round.round_id, RoundState.FAILED, now=now,
                                        failure_reason="task cancelled")
        self._store.set_task_state(
            task_id, TaskState.CANCELLED,
            f"cancelled by an operator: {reason}" if reason else "cancelled by an operator")
        return self.view(task_id)

    def record(self, task_id: str) -> TaskRecord:
        try:
            return self._store.get_task(task_id)
        except storage_errors.NotFound:
            raise NotFound(f"no task with id {shown(task_id)}") from None

    def _new_declines(self, task_id: str, spec: TaskSpec) -> Declines:
        declines = self._declines[task_id] = Declines.for_task(spec.min_reports)
        return declines

    def _spec(self, record: TaskRecord) -> TaskSpec:
        """The stored spec. Raises Unavailable (with the field) when a spec stored by an older
        version is refused by today's rules (e.g. a DP task without a budget)."""
        data = json.loads(record.spec_json)
        assert isinstance(data, dict)
        try:
            return spec_from_dict(data, source=f"task {record.task_id}")
        except CoreError as exc:
            raise Unavailable(f"the stored spec of task {record.task_id} no longer "
                              f"validates: {exc}") from None

    def _committed_metrics(self, task_id: str) -> list[dict[str, float]]:
        return [dict(r.metrics) for r in self._store.list_rounds(task_id)
                if r.state is RoundState.COMMITTED]

    def _privacy_status(self, task_id: str, spec: TaskSpec) -> PrivacyStatus | None:
        """Epsilon spent, budget and sampling: from the running task's accountant, else
        recomputed from the committed rounds' records."""
        task = self._running.get(task_id)
        if task is not None:
            return task.privacy.status() if task.privacy is not None else None
        return status_of_records(spec, self._committed_metrics(task_id))


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:24] or "task"
