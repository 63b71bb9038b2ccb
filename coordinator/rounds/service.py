"""The coordinator's domain service: tasks, rounds, selection, uploads, aggregation.

Round lifecycle (each transition persisted before anything depends on it)::

    SELECTING --window closes, target admitted--> TRAINING --goal reached--> AGGREGATING
        |                                            |  deadline, >= min_reports ^
        +------------- deadline, < min_reports ------+--> FAILED (reason)       |
                                                                    COMMITTED <-+

SELECTING: eligible devices that check in during the selection window become candidates;
when it closes, ``clients_per_round x over_selection`` of them are admitted uniformly at
random, the rest are told when to come back. While the round is still short of that target
after the window, later eligible check-ins are admitted as they come. TRAINING ends when
``clients_per_round`` updates were accepted (over-selected stragglers are then late), when
the deadline passes, or when no admitted device can still report. A failed round is redone
as a new attempt of the same round number. After a crash, open rounds are failed at start
and redone: an aggregate never mixes two attempts, because the accumulator lives only in
memory and only one attempt per round is ever open.

Thread-safety: not thread-safe. The gRPC transport calls it from one asyncio event loop.
Time comes from the injected clock; randomness from the injected ``random.Random``
(``random.SystemRandom`` in production).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import random
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from coordinator.rounds.aggregators import (
    Aggregate,
    Aggregator,
    ReleaseRefused,
    begin_aggregation,
    metrics_policy_for,
)
from coordinator.rounds.clock import Clock
from coordinator.rounds.errors import (
    Duplicate,
    InvalidRequest,
    Late,
    NotFound,
    NotSelected,
    TooLarge,
    Unavailable,
)
from coordinator.rounds.secure import SecureRound
from coordinator.rounds.selection import Admission, SelectionPolicy, Selector, is_eligible
from coordinator.rounds.uploads import SpooledUpload, all_finite
from coordinator.storage import FileBlobStore, Store
from coordinator.storage import errors as storage_errors
from coordinator.storage.records import ModelVersionRecord, RoundRecord, TaskRecord
from core.aggregation.server_optimizers import apply_server_optimizer
from core.errors import CoreError
from core.privacy.accounting import Sampling
from core.privacy.errors import InsecureNoiseError, PrivacyError
from core.privacy.noise import NoiseSource
from core.privacy.spec import FixedClip, PrivacyMode
from core.privacy.task import PrivacyStatus, TaskPrivacy
from core.protocol import (
    CheckInOutcome,
    CheckInResult,
    MetricsPolicy,
    Participation,
    Plan,
    PlanPrivacy,
    SecAggPlan,
    UpdateHeader,
)
from core.secagg import encoding
from core.secagg.messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    RingVector,
    ShareKeysRequest,
    ShareKeysResponse,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from core.secagg.params import SecAggParamError, SecAggParams, derive
from core.secagg.server import SecAggAborted
from core.taskspec import spec_from_dict, spec_to_dict
from core.tensors import (
    TensorInfo,
    from_raw_bytes,
    load_safetensors,
    save_safetensors,
    sha256_hex,
    tensor_infos,
)
from core.types import (
    DeviceAttributes,
    ParticipantState,
    RoundState,
    ServerOptimizer,
    ServerOptimizerKind,
    TaskSpec,
    TaskState,
)

log = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_METRICS = 32


@dataclass(frozen=True)
class ServiceConfig:
    """Limits of the service; every wait the devices are told about is bounded here."""

    max_chunk_bytes: int = 1 << 20
    retry_after_min_s: float = 0.2
    retry_after_max_s: float = 5.0
    #: A task fails after this many failed attempts in a row.
    max_failed_attempts: int = 20
    max_num_examples: int = 1 << 31
    #: Tests and simulations only: accept a seeded (reproducible, *insecure*) noise source
    #: for differential privacy. Production keeps False, and the service then refuses any
    #: source but :meth:`NoiseSource.secure`.
    allow_seeded_noise: bool = False


@dataclass(frozen=True)
class TaskView:
    record: TaskRecord
    spec: TaskSpec
    current_round: RoundRecord | None
    #: Central / distributed DP: epsilon spent, the budget and the sampling performed.
    privacy: PrivacyStatus | None = None
    #: How devices' metrics leave them (what the task releases of them).
    metrics: MetricsPolicy = MetricsPolicy.CLEAR


@dataclass
class _Model:
    version: int
    params: dict[str, np.ndarray]
    infos: list[TensorInfo]
    nbytes: int
    record: ModelVersionRecord
    optimizer_state: dict[str, np.ndarray] | None


@dataclass
class _Seat:
    token_hash: str
    token: str
    evaluate: bool


@dataclass
class _OpenRound:
    round_id: int
    round_number: int
    state: RoundState
    started: float
    deadline: float
    selector: Selector
    aggregator: Aggregator
    #: Reports that close the round: clients_per_round, or (DP) every admitted device.
    goal: int
    seats: dict[str, _Seat] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    errored: set[str] = field(default_factory=set)
    uploading: set[str] = field(default_factory=set)
    secure: SecureRound | None = None


@dataclass
class _Task:
    task_id: str
    spec: TaskSpec
    model: _Model
    round: _OpenRound | None = None
    secagg: SecAggParams | None = None
    privacy: TaskPrivacy | None = None
    failed_attempts: int = 0
    #: Seats of the last closed attempt, so its late devices hear "closed", not "not selected".
    closed_seats: dict[str, _Seat] = field(default_factory=dict)


class Upload:
    """An update being received; call :meth:`CoordinatorService.finish_upload` or
    :meth:`CoordinatorService.abort_upload` with it."""

    def __init__(self, header: UpdateHeader, spool: SpooledUpload, round_id: int) -> None:
        self.header = header
        self.spool = spool
        self.round_id = round_id

    def write(self, chunk: bytes) -> None:
        self.spool.write(chunk)


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class CoordinatorService:
    def __init__(
        self,
        store: Store,
        blobs: FileBlobStore,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        config: ServiceConfig | None = None,
        noise: NoiseSource | None = None,
    ) -> None:
        """``noise`` is where differential-privacy noise comes from (default: the CSPRNG).

        Raises:
            InsecureNoiseError: a seeded ``noise`` without ``config.allow_seeded_noise``.
        """
        self._store = store
        self._blobs = blobs
        self._clock = clock
        self._rng = rng if rng is not None else random.SystemRandom()
        # Retry jitter needs no CSPRNG, and is on the check-in hot path.
        self._jitter = random.Random(self._rng.getrandbits(64))
        self.config = config or ServiceConfig()
        self._noise = noise if noise is not None else NoiseSource.secure()
        if not self._noise.is_secure and not self.config.allow_seeded_noise:
            raise InsecureNoiseError(
                "the coordinator needs a cryptographically secure noise source for "
                "differential privacy; a seeded one is accepted only with "
                "ServiceConfig(allow_seeded_noise=True), in tests and simulations")
        self._tasks: dict[str, _Task] = {}
        self._evaluator: _ServerEvaluator = _ServerEvaluator()
        self._progress_listeners: list[Callable[[], None]] = []

    def add_progress_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called whenever a secure-aggregation stage closes or a round
        ends, so transports can wake the devices waiting for it."""
        self._progress_listeners.append(listener)

    def _progress(self) -> None:
        for listener in self._progress_listeners:
            listener()

    # ------------------------------------------------------------------ start-up

    def recover(self) -> None:
        """Loads running tasks after a (re)start; open rounds from before are failed and redone."""
        now = self._clock.now()
        self._blobs.clear_spool()
        interrupted = {
            rec.task_id: rec
            for rec in self._store.fail_open_rounds(
                "coordinator restarted while the round was open; the round is redone", now
            )
        }
        for task in self._store.list_tasks():
            if task.state is not TaskState.RUNNING:
                continue
            try:
                spec = spec_from_dict(_json_loads(task.spec_json), source=f"task {task.task_id}")
            except CoreError as exc:
                # A task stored by an older version that today's rules refuse (e.g. a DP task
                # without a budget) must not run on unchecked: it ends, with the reason.
                log.error("task %s cannot continue: %s", task.task_id, exc)
                self._store.set_task_state(task.task_id, TaskState.FAILED,
                                           f"its task file no longer validates: {exc}")
                continue
            model = self._load_model(self._store.latest_model_version(task.task_id))
            committed = [r.metrics for r in self._store.list_rounds(task.task_id)
                         if r.state is RoundState.COMMITTED]
            privacy = _task_privacy(spec, committed)
            runtime = _Task(task.task_id, spec, model, secagg=_secagg_params(spec, privacy),
                            privacy=privacy)
            if task.task_id in interrupted:
                rec = interrupted[task.task_id]
                log.warning("round %d of task %s was open at restart; redoing it",
                            rec.round_number, task.task_id)
                runtime.closed_seats = {
                    p.device_id: _Seat(p.token_hash, "", False)
                    for p in self._store.list_participants(rec.round_id)
                }
            self._tasks[task.task_id] = runtime
            self._open_next_round(runtime, now)

    def warm_up(self) -> None:
        """Pays torch's one-time optimizer start-up (about 2 s: torch._dynamo's import)
        before serving, instead of inside the first round's aggregation."""
        for kind in ServerOptimizerKind:
            apply_server_optimizer(
                {"w": np.zeros(1, np.float32)}, {"w": np.zeros(1, np.float32)},
                ServerOptimizer(kind=kind), None,
            )

    # ------------------------------------------------------------------ admin

    def create_task(self, spec: TaskSpec) -> TaskView:
        from core.models import initial_state  # torch: imported only when needed

        try:
            params = initial_state(spec.model, seed=spec.seed)
        except CoreError as exc:
            raise InvalidRequest(f"spec.model: {exc}") from None
        if spec.evaluation.server_data:
            self._evaluator.check(spec)
        _check_privacy_supported(spec)
        privacy = _task_privacy(spec, [])
        secagg = _secagg_params(spec, privacy)
        task_id = f"{_slug(spec.name)}-{secrets.token_hex(4)}"
        now = self._clock.now()
        record = self._write_model(task_id, 0, 0, params, None, now)
        self._store.create_task(task_id, _json_dumps(spec_to_dict(spec)), record, now)
        infos = tensor_infos(params)
        task = _Task(
            task_id,
            spec,
            _Model(0, params, infos, sum(i.nbytes for i in infos), record, None),
            secagg=secagg,
            privacy=privacy,
        )
        self._tasks[task_id] = task
        self._open_next_round(task, now)
        log.info("created task %s (%s)", task_id, spec.name)
        return self.get_task(task_id)

    def get_task(self, task_id: str) -> TaskView:
        record = self._task_record(task_id)
        spec = spec_from_dict(_json_loads(record.spec_json), source=f"task {task_id}")
        return TaskView(record, spec, self._store.open_round_of(task_id),
                        privacy=self._privacy_status(task_id, spec),
                        metrics=metrics_policy_for(spec))

    def _privacy_status(self, task_id: str, spec: TaskSpec) -> PrivacyStatus | None:
        """Epsilon spent, budget and sampling: from the running task's accountant, else
        recomputed from the committed rounds' records."""
        task = self._tasks.get(task_id)
        if task is not None:
            return task.privacy.status() if task.privacy is not None else None
        committed = [r.metrics for r in self._store.list_rounds(task_id)
                     if r.state is RoundState.COMMITTED]
        try:
            privacy = TaskPrivacy.for_task(spec, committed)
        except ValueError:
            return None
        return privacy.status() if privacy is not None else None

    def list_tasks(self) -> list[TaskView]:
        return [self.get_task(t.task_id) for t in self._store.list_tasks()]

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        self._task_record(task_id)
        return self._store.list_rounds(task_id)

    def cancel_task(self, task_id: str) -> TaskView:
        record = self._task_record(task_id)
        if record.state.is_final:
            raise Late(f"task {task_id} is already {record.state.value}; nothing to cancel")
        task = self._tasks.pop(task_id, None)
        if task is not None and task.round is not None:
            self._store.set_round_state(
                task.round.round_id, RoundState.FAILED, now=self._clock.now(),
                failure_reason="task cancelled",
            )
        self._store.set_task_state(task_id, TaskState.CANCELLED, "cancelled by an operator")
        return self.get_task(task_id)

    def model_version(self, task_id: str, version: int | None) -> ModelVersionRecord:
        """The record of ``version`` (None: the latest committed one)."""
        self._task_record(task_id)
        try:
            if version is None:
                return self._store.latest_model_version(task_id)
            return self._store.get_model_version(task_id, version)
        except storage_errors.NotFound:
            raise NotFound(f"task {task_id} has no model version {version}") from None

    def model_chunks(self, record: ModelVersionRecord, chunk_bytes: int) -> Iterator[bytes]:
        with self._blobs.open_read(record.path) as f:
            while chunk := f.read(chunk_bytes):
                yield chunk

    # ------------------------------------------------------------------ devices

    def check_in(
        self, device_id: str, attrs: DeviceAttributes, task_id: str | None = None
    ) -> CheckInResult:
        _check_device_id(device_id)
        now = self._clock.now()
        if task_id:
            # The hot path: running tasks are answered from memory, without the database.
            task = self._tasks.get(task_id)
            if task is None:
                record = self._task_record(task_id)
                if record.state.is_final:
                    return CheckInResult(
                        CheckInOutcome.FINISHED, task_id=task_id,
                        message=f"task {task_id} is {record.state.value}",
                    )
                return self._retry(CheckInOutcome.NO_TASK, 1.0, f"task {task_id} is not loaded")
            if not is_eligible(attrs, task.spec.eligibility, task.spec.population):
                return self._retry(
                    CheckInOutcome.NO_TASK, self.config.retry_after_max_s,
                    f"device is not eligible for task {task_id} "
                    f"(population {task.spec.population!r}, {task.spec.eligibility})",
                )
        else:
            candidates = [
                t for t in self._tasks.values()
                if is_eligible(attrs, t.spec.eligibility, t.spec.population)
            ]
            if not candidates:
                return self._retry(
                    CheckInOutcome.NO_TASK, self.config.retry_after_max_s,
                    "no running task for this device",
                )
            task = self._rng.choice(candidates)
        self._advance(task, now)
        rnd = task.round
        if rnd is None:
            return self._retry(CheckInOutcome.RETRY_LATER, self.config.retry_after_min_s,
                               "no round is open; come back soon", task.task_id)
        seat = rnd.seats.get(device_id)
        if seat is not None:
            return self._accepted(task, rnd, device_id, seat)
        if rnd.state is RoundState.SELECTING:
            admission = rnd.selector.check_in(device_id, now, len(rnd.seats))
            if admission is Admission.CANDIDATE:
                return self._retry(
                    CheckInOutcome.RETRY_LATER, rnd.selector.window_closes - now + 0.05,
                    "selection window open; check in again when it closes", task.task_id,
                )
            if admission is Admission.ADMIT and (rnd.secure is None
                                                 or rnd.secure.stage is Stage.ADVERTISE):
                seat = self._admit(task, rnd, [device_id], now)[0]
                self._advance(task, now)
                return self._accepted(task, rnd, device_id, seat)
        return self._retry(
            CheckInOutcome.RETRY_LATER, rnd.deadline - now,
            f"round {rnd.round_number} is full; come back for the next round", task.task_id,
        )

    def get_plan(self, p: Participation) -> Plan:
        task, rnd, seat = self._seat(p)
        spec = task.spec
        return Plan(
            task_id=task.task_id,
            round_number=rnd.round_number,
            model=spec.model,
            model_version=task.model.version,
            model_sha256=task.model.record.sha256,
            model_size_bytes=task.model.record.size_bytes,
            local=spec.local,
            evaluate=seat.evaluate,
            deadline=rnd.deadline,
            max_update_bytes=self._max_update_bytes(task),
            max_chunk_bytes=self.config.max_chunk_bytes,
            update_tensors=list(task.model.infos),
            seed=spec.seed,
            secure_aggregation=rnd.secure.plan if rnd.secure is not None else None,
            privacy=_plan_privacy(task),
            metrics=rnd.aggregator.metrics_policy,
        )

    def model_for_participant(self, p: Participation, version: int) -> ModelVersionRecord:
        task, _, _ = self._seat(p)
        if version not in (0, task.model.version):
            raise InvalidRequest(
                f"this round trains model version {task.model.version}, not {version}"
            )
        return task.model.record

    def begin_upload(self, header: UpdateHeader) -> Upload:
        """Checks an update's header; the caller then streams chunks into the returned Upload."""
        task, rnd, _ = self._seat(header.participation)
        device = header.participation.device_id
        rnd.aggregator.check_upload(header.metrics)
        if device in rnd.reported:
            raise Duplicate(f"device {device} already reported for round {rnd.round_number}")
        if device in rnd.uploading:
            raise Duplicate(f"device {device} already has an upload in progress")
        limit = self._max_update_bytes(task)
        if header.total_bytes > limit:
            raise TooLarge(
                f"update of {header.total_bytes} bytes exceeds the task's limit of {limit} "
                "bytes (max_update_bytes)"
            )
        expected = task.model.infos
        if list(header.tensors) != expected:
            raise InvalidRequest(_describe_mismatch(header.tensors, expected))
        if header.total_bytes != task.model.nbytes:
            raise InvalidRequest(
                f"header declares {header.total_bytes} bytes but the update of this model is "
                f"{task.model.nbytes} bytes"
            )
        if not 1 <= header.num_examples <= self.config.max_num_examples:
            raise InvalidRequest(
                f"num_examples must be between 1 and {self.config.max_num_examples}, "
                f"got {header.num_examples}"
            )
        _check_metrics(header.metrics)
        path = self._blobs.spool_path(f"{task.task_id}-{rnd.round_id}-{secrets.token_hex(8)}.upd")
        spool = SpooledUpload(
            path, declared_bytes=header.total_bytes, sha256=header.sha256,
            max_chunk_bytes=self.config.max_chunk_bytes,
        )
        rnd.uploading.add(device)
        return Upload(header, spool, rnd.round_id)

    def abort_upload(self, upload: Upload) -> None:
        upload.spool.discard()
        task = self._tasks.get(upload.header.participation.task_id)
        if task is not None and task.round is not None and task.round.round_id == upload.round_id:
            task.round.uploading.discard(upload.header.participation.device_id)

    def finish_upload(self, upload: Upload) -> None:
        """Checks the received update whole and folds it into the round's aggregate.

        Raises the same errors as :meth:`begin_upload`, plus InvalidRequest for a size or
        hash mismatch and non-finite values, and Late if the round closed meanwhile.
        The upload's spool file is removed in every case.
        """
        try:
            path = upload.spool.finish()
            task, rnd, _ = self._seat(upload.header.participation)
            if rnd.round_id != upload.round_id:
                raise Late(f"round {rnd.round_number} was restarted while the update was sent")
            device = upload.header.participation.device_id
            if device in rnd.reported:
                raise Duplicate(f"device {device} already reported for round {rnd.round_number}")
            if not all_finite(path):
                self._store.set_participant_state(
                    rnd.round_id, device, ParticipantState.REJECTED, now=self._clock.now()
                )
                rnd.errored.add(device)
                raise InvalidRequest("update contains NaN or infinite values; it was rejected")
            stored = rnd.aggregator.check_upload(upload.header.metrics)
            clear = rnd.aggregator.metrics_policy is MetricsPolicy.CLEAR
            # Recorded first: an update counts in the aggregate only once the database says so.
            self._store.set_participant_state(
                rnd.round_id, device, ParticipantState.REPORTED, now=self._clock.now(),
                num_examples=upload.header.num_examples if clear else 0, metrics=stored,
            )
            rnd.aggregator.add_upload(path, upload.header.num_examples, upload.header.metrics)
            rnd.reported.add(device)
        finally:
            self.abort_upload(upload)
        self._advance(task, self._clock.now())

    def report_status(
        self, p: Participation, metrics: Mapping[str, float], error: str
    ) -> None:
        task, rnd, _ = self._seat(p)
        _check_metrics(metrics)
        if error:
            log.info("device %s could not take part in round %s: %s",
                     p.device_id, rnd.round_number, error[:200])
            rnd.errored.add(p.device_id)
            # Only a task whose devices report metrics in the clear keeps them per device.
            clear = rnd.aggregator.metrics_policy is MetricsPolicy.CLEAR
            self._store.set_participant_state(
                rnd.round_id, p.device_id, ParticipantState.ERRORED, now=self._clock.now(),
                metrics=dict(metrics) if clear else {},
            )
            self._advance(task, self._clock.now())

    # ------------------------------------------------------------------ secure aggregation

    def secagg_advertise(self, p: Participation, message: KeyAdvertisement) -> None:
        task, rnd, secure = self._secure_seat(p)
        secure.advertise(p.device_id, message)
        self._advance(task, self._clock.now())

    def secagg_share_keys(self, p: Participation, message: ShareKeysResponse) -> None:
        task, rnd, secure = self._secure_seat(p)
        secure.share_keys(p.device_id, message)
        self._advance(task, self._clock.now())

    def secagg_masked_input(self, p: Participation, vector: RingVector,
                            metrics: Mapping[str, float], clipped: int) -> None:
        task, rnd, _ = self._secure_seat(p)
        if metrics:
            raise InvalidRequest(
                "under secure aggregation a device's metrics travel inside its masked vector, "
                f"never in the clear; this message carried {', '.join(sorted(metrics)[:4])}")
        rnd.aggregator.add_masked(p.device_id, vector, clipped)
        # Nothing per device is stored: the example count and the metrics stay masked.
        self._store.set_participant_state(
            rnd.round_id, p.device_id, ParticipantState.REPORTED, now=self._clock.now(),
        )
        rnd.reported.add(p.device_id)
        self._advance(task, self._clock.now())

    def secagg_unmask(self, p: Participation, message: UnmaskResponse) -> None:
        task, rnd, secure = self._secure_seat(p)
        secure.unmask(p.device_id, message)
        self._advance(task, self._clock.now())

    def secagg_reply(self, p: Participation, after: Stage) -> object | None:
        """The device's message for the stage after ``after`` once ``after`` closed; None
        while it is open. Raises Late once the device or the round is out of the protocol."""
        task = self._tasks.get(p.task_id)
        if task is not None:
            self._advance(task, self._clock.now())
        _, _, secure = self._secure_seat(p)
        return secure.reply(p.device_id, after)

    def secagg_plan(self, p: Participation) -> SecAggPlan:
        """This round's secure-aggregation parameters, for a seated device."""
        return self._secure_seat(p)[2].plan

    def _secure_seat(self, p: Participation) -> tuple[_Task, _OpenRound, SecureRound]:
        task, rnd, _ = self._seat(p)
        if rnd.secure is None:
            raise InvalidRequest(f"task {p.task_id} does not use secure aggregation")
        return task, rnd, rnd.secure

    def _advance_secure(self, task: _Task, rnd: _OpenRound, secure: SecureRound,
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
                    self._fail_round(
                        task, rnd, now,
                        f"deadline passed with {secure.server.advertised} of the "
                        f"{spec.min_reports} key advertisements needed for secure aggregation "
                        f"({len(rnd.seats)} admitted, {len(rnd.errored)} errored)",
                    )
                    return
                stage = secure.stage
                if stage is Stage.ADVERTISE:
                    self._start_training(rnd, now)  # the cohort is fixed from here on
                secure.close_stage(now)
                self._progress()
                if stage is Stage.MASKED_INPUT and len(rnd.reported) < spec.min_reports:
                    raise secure.server.abort(f"only {len(rnd.reported)} masked inputs "
                                              f"arrived; min_reports is {spec.min_reports}")
                if secure.result is not None:
                    self._release(task, rnd, now)
                    return
        except SecAggAborted as exc:
            self._fail_round(task, rnd, now, f"secure aggregation aborted: {exc}")

    def tick(self) -> None:
        """Drives deadlines and selection windows; call it periodically (e.g. every 100 ms)."""
        now = self._clock.now()
        for task in list(self._tasks.values()):
            self._advance(task, now)

    # ------------------------------------------------------------------ round machinery

    def _advance(self, task: _Task, now: float) -> None:
        rnd = task.round
        if rnd is None:
            return
        spec = task.spec
        if rnd.state is RoundState.SELECTING and rnd.selector.due(now):
            if not self._close_selection(task, rnd, now):
                return
        if rnd.state is RoundState.SELECTING and len(rnd.seats) >= spec.selection_target:
            self._start_training(rnd, now)
        if rnd.secure is not None:
            self._advance_secure(task, rnd, rnd.secure, now)
            return
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
                self._fail_round(
                    task, rnd, now,
                    f"{why} with {reports} of the {spec.min_reports} reports needed "
                    f"({len(rnd.seats)} admitted, {len(rnd.errored)} errored)",
                )

    def _close_selection(self, task: _Task, rnd: _OpenRound, now: float) -> bool:
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
                self._fail_round(
                    task, rnd, now,
                    f"only {draw.eligible} eligible devices checked in: a cohort of "
                    f"{draw.cohort} drawn from them (q = {draw.sampling_rate:.4g}) would take "
                    f"epsilon to {after:.4g}, past the budget {task.privacy.budget:.4g}")
                return False
            if draw.cohort < task.spec.min_reports:
                self._fail_round(
                    task, rnd, now,
                    f"selection closed with {draw.eligible} eligible devices; a cohort of "
                    f"{draw.cohort} cannot reach min_reports {task.spec.min_reports}")
                return False
        if chosen:
            self._admit(task, rnd, chosen, now)
        if task.privacy is not None:
            rnd.goal = len(rnd.seats)
            self._start_training(rnd, now)
            if rnd.secure is not None:
                rnd.secure.goal = len(rnd.seats)
        return True

    def _start_training(self, rnd: _OpenRound, now: float) -> None:
        if rnd.state is RoundState.SELECTING:
            self._store.set_round_state(rnd.round_id, RoundState.TRAINING, now=now)
            rnd.state = RoundState.TRAINING

    def _admit(self, task: _Task, rnd: _OpenRound, devices: list[str], now: float) -> list[_Seat]:
        seats = []
        for _ in devices:
            token = secrets.token_urlsafe(18)
            evaluate = self._rng.random() < task.spec.evaluation.fraction
            seats.append(_Seat(_hash_token(token), token, evaluate))
        self._store.add_participants(
            rnd.round_id, [(d, s.token_hash) for d, s in zip(devices, seats, strict=True)], now
        )
        for d, s in zip(devices, seats, strict=True):
            rnd.seats[d] = s
        return seats

    def _open_next_round(self, task: _Task, now: float) -> None:
        record = self._store.get_task(task.task_id)
        if record.state is not TaskState.RUNNING:
            return
        if record.rounds_committed >= task.spec.rounds:
            self._store.set_task_state(task.task_id, TaskState.COMPLETED)
            self._tasks.pop(task.task_id, None)
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
                self._tasks.pop(task.task_id, None)
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
            plan = SecAggPlan(task.secagg, context.encode(), spec.secure_aggregation.phase_timeout_s)
            secure = SecureRound.open(plan, goal=spec.clients_per_round)
        task.round = _OpenRound(
            round_id=rec.round_id,
            round_number=rec.round_number,
            state=RoundState.SELECTING,
            started=now,
            deadline=deadline,
            selector=Selector(_selection_policy(spec), opened=now,
                              window_s=spec.selection_window_s, last_close=deadline,
                              rng=self._rng),
            aggregator=begin_aggregation(
                spec, task.model.nbytes // 4, privacy=task.privacy, secure=secure, noise=self._noise,
                require_secure_noise=not self.config.allow_seeded_noise),
            goal=spec.clients_per_round,
            secure=secure,
        )

    def _fail_round(self, task: _Task, rnd: _OpenRound, now: float, reason: str) -> None:
        log.warning("task %s round %d failed: %s", task.task_id, rnd.round_number, reason)
        self._store.set_round_state(rnd.round_id, RoundState.FAILED, now=now, failure_reason=reason)
        task.round = None
        task.closed_seats = rnd.seats
        task.failed_attempts += 1
        self._progress()
        if task.failed_attempts >= self.config.max_failed_attempts:
            self._store.set_task_state(
                task.task_id, TaskState.FAILED,
                f"{task.failed_attempts} round attempts in a row failed; last: {reason}",
            )
            self._tasks.pop(task.task_id, None)
            return
        self._open_next_round(task, now)

    def _release(self, task: _Task, rnd: _OpenRound, now: float) -> None:
        """The round's one release call, then the commit; a refused release fails the round
        (nothing committed, nothing accounted)."""
        try:
            aggregate = rnd.aggregator.release(rnd.selector.draw)
        except ReleaseRefused as exc:
            self._fail_round(task, rnd, now, str(exc))
            return
        except Exception as exc:  # a round must never stay open half-done
            log.exception("releasing round %d of task %s failed", rnd.round_number,
                          task.task_id)
            self._fail_round(task, rnd, now,
                             f"aggregation failed: {type(exc).__name__}: {exc}")
            return
        self._commit(task, rnd, aggregate, now)

    def _commit(self, task: _Task, rnd: _OpenRound, aggregate: Aggregate, now: float) -> None:
        """Applies the round's mean update with the server optimizer and commits the model;
        a DP release counts towards the task's epsilon once the commit is durable."""
        mean = aggregate.mean
        release = aggregate.release
        self._start_training(rnd, now)
        self._store.set_round_state(rnd.round_id, RoundState.AGGREGATING, now=now)
        rnd.state = RoundState.AGGREGATING
        try:
            delta = from_raw_bytes(mean.astype("<f4").tobytes(), task.model.infos)
            params, opt_state = apply_server_optimizer(
                task.model.params, delta, task.spec.server, task.model.optimizer_state
            )
            if not all(np.isfinite(v).all() for v in params.values()):
                raise ValueError("the server optimizer produced non-finite parameters")
        except (ValueError, CoreError) as exc:
            self._fail_round(task, rnd, now, f"aggregation failed: {exc}")
            return
        version = task.model.version + 1
        record = self._write_model(task.task_id, version, rnd.round_number, params, opt_state, now)
        metrics = {
            "reports": float(len(rnd.reported)),
            "admitted": float(len(rnd.seats)),
            "round_seconds": now - rnd.started,
            **aggregate.metrics,
        }
        self._store.commit_round(rnd.round_id, record, metrics, now)
        if release is not None:
            assert task.privacy is not None
            task.privacy.committed(release)
        task.model = _Model(version, params, task.model.infos, task.model.nbytes, record, opt_state)
        task.round = None
        task.closed_seats = rnd.seats
        task.failed_attempts = 0
        self._progress()
        log.info("task %s committed round %d (model v%d, %d reports)",
                 task.task_id, rnd.round_number, version, len(rnd.reported))
        if task.spec.evaluation.server_data:
            try:
                loss, acc = self._evaluator.evaluate(task.spec, params)
                self._store.update_round_metrics(
                    rnd.round_id, {"server_eval_loss": loss, "server_eval_accuracy": acc}
                )
            except Exception:  # evaluation must never undo a commit
                log.exception("server-side evaluation of task %s failed", task.task_id)
        self._open_next_round(task, now)

    # ------------------------------------------------------------------ helpers

    def _write_model(
        self,
        task_id: str,
        version: int,
        round_number: int,
        params: dict[str, np.ndarray],
        opt_state: dict[str, np.ndarray] | None,
        now: float,
    ) -> ModelVersionRecord:
        base = f"tasks/{task_id}/model-v{version:06d}"
        data = save_safetensors(params, {"task_id": task_id, "version": str(version)})
        sha, size = self._blobs.write(f"{base}.safetensors", data)
        opt_path = None
        if opt_state:
            opt_path = f"{base}.optimizer.safetensors"
            self._blobs.write(opt_path, save_safetensors(opt_state))
        return ModelVersionRecord(
            task_id=task_id, version=version, round_number=round_number,
            path=f"{base}.safetensors", sha256=sha, size_bytes=size,
            optimizer_state_path=opt_path, created_at=now,
        )

    def _load_model(self, record: ModelVersionRecord) -> _Model:
        data = self._blobs.read_bytes(record.path)
        if sha256_hex(data) != record.sha256:
            raise Unavailable(
                f"model file {record.path} does not match its recorded sha256; "
                "refusing to continue the task from a corrupted model"
            )
        params = load_safetensors(data)
        opt = None
        if record.optimizer_state_path:
            opt = load_safetensors(self._blobs.read_bytes(record.optimizer_state_path))
        infos = tensor_infos(params)
        return _Model(record.version, params, infos, sum(i.nbytes for i in infos), record, opt)

    def _task_record(self, task_id: str) -> TaskRecord:
        try:
            return self._store.get_task(task_id)
        except storage_errors.NotFound:
            raise NotFound(f"no task with id {task_id!r}") from None

    def _seat(self, p: Participation) -> tuple[_Task, _OpenRound, _Seat]:
        task = self._tasks.get(p.task_id)
        if task is None:
            record = self._task_record(p.task_id)
            raise Late(f"task {p.task_id} is {record.state.value}; check in again")
        rnd = task.round
        if rnd is None or rnd.round_number != p.round_number or rnd.state not in (
            RoundState.SELECTING, RoundState.TRAINING
        ):
            raise Late(
                f"round {p.round_number} of task {p.task_id} is closed; check in again"
            )
        seat = rnd.seats.get(p.device_id)
        old = task.closed_seats.get(p.device_id)
        if seat is None and old is not None and hmac.compare_digest(
            old.token_hash, _hash_token(p.token)
        ):
            raise Late(f"the attempt of round {p.round_number} this device joined was closed; "
                       "check in again")
        if seat is None or not hmac.compare_digest(seat.token_hash, _hash_token(p.token)):
            raise NotSelected(
                f"device {p.device_id!r} is not selected for round {p.round_number} of task "
                f"{p.task_id} (or its participation token is wrong)"
            )
        return task, rnd, seat

    def _accepted(self, task: _Task, rnd: _OpenRound, device_id: str, seat: _Seat) -> CheckInResult:
        return CheckInResult(
            CheckInOutcome.ACCEPTED, task_id=task.task_id, round_number=rnd.round_number,
            token=seat.token, message=f"selected for round {rnd.round_number}",
        )

    def _retry(
        self, outcome: CheckInOutcome, after_s: float, message: str, task_id: str = ""
    ) -> CheckInResult:
        lo, hi = self.config.retry_after_min_s, self.config.retry_after_max_s
        after = min(max(after_s, lo), hi) * self._jitter.uniform(1.0, 1.2)
        return CheckInResult(outcome, task_id=task_id, retry_after_s=after, message=message)

    def _max_update_bytes(self, task: _Task) -> int:
        return task.spec.max_update_bytes or task.model.nbytes


class _ServerEvaluator:
    """Evaluates committed models on a data spec named by the task (torch imported lazily)."""

    def check(self, spec: TaskSpec) -> None:
        from core.data.spec import parse_data_spec

        try:
            parse_data_spec(spec.evaluation.server_data)
        except CoreError as exc:
            raise InvalidRequest(f"spec.evaluation.server_data: {exc}") from None

    def evaluate(self, spec: TaskSpec, params: Mapping[str, np.ndarray]) -> tuple[float, float]:
        from core.data.spec import load_dataset
        from core.models import build_model, load_numpy_state
        from core.training import evaluate

        data = load_dataset(spec.evaluation.server_data)
        model = build_model(spec.model)
        load_numpy_state(model, params)
        return evaluate(model, data.x_test, data.y_test)


def _secagg_params(spec: TaskSpec, privacy: TaskPrivacy | None) -> SecAggParams | None:
    """The task's secure-aggregation parameters. Under DP every device weighs 1 (weight_cap
    1: the update is encoded unscaled and the weight coordinate counts devices). Distributed
    DP also sets the per-coordinate range to the L2 clip C (nothing clipped twice) and leaves
    the ring headroom for the devices' integer noise, whose total std (in quantization steps)
    it hands to ``privacy``."""
    if spec.secure_aggregation is None:
        return None
    config = spec.secure_aggregation
    if privacy is not None:
        config = replace(config, weight_cap=1)
        if privacy.distributed:
            config = replace(config, clip=privacy.clip, bits=encoding.distributed_value_bits(
                spec.selection_target, privacy.noise_multiplier))
    try:
        params = derive(config, spec.selection_target)
    except SecAggParamError as exc:
        raise InvalidRequest(f"spec.secure_aggregation: {exc}") from None
    if privacy is not None and privacy.distributed:
        if params.ring_bits != 32:
            raise InvalidRequest("spec.secure_aggregation: distributed DP needs the 32-bit ring")
        privacy.distributed_noise_steps = encoding.noise_std_in_steps(
            params, privacy.noise_multiplier)
    return params


def _selection_policy(spec: TaskSpec) -> SelectionPolicy:
    """Uniform fixed-size selection with late admission without DP; under DP the sampling
    the task's accountant analyses, and no late admission."""
    privacy = spec.privacy
    if privacy is None or privacy.population is None:
        return SelectionPolicy(Sampling.FIXED_SIZE, spec.selection_target,
                               population=max(spec.selection_target, 1 << 62),
                               late_admission=True)
    return SelectionPolicy(privacy.sampling, spec.selection_target,
                           population=privacy.population, late_admission=False,
                           min_cohort=spec.min_reports)


def _check_privacy_supported(spec: TaskSpec) -> None:
    privacy = spec.privacy
    if privacy is None:
        return
    if privacy.mode in (PrivacyMode.CENTRAL, PrivacyMode.DISTRIBUTED):
        if privacy.budget is None:
            raise InvalidRequest("spec.privacy.max_epsilon: a DP task needs a budget (or "
                                 "target_epsilon, which is then the budget)")
        assert privacy.population is not None
        if spec.selection_target > privacy.population:
            raise InvalidRequest(
                f"spec.privacy.population: {privacy.population} devices cannot supply a "
                f"cohort of {spec.selection_target} (clients_per_round x over_selection)")
        if privacy.sampling is Sampling.POISSON and spec.secure_aggregation is not None:
            raise InvalidRequest(
                "spec.privacy.sampling: poisson makes the cohort size random, but secure "
                "aggregation's parameters are derived for a fixed cohort; use sampling: fixed")
    if privacy.mode is PrivacyMode.DISTRIBUTED and not isinstance(privacy.clip, FixedClip):
        raise InvalidRequest("spec.privacy.clip: distributed DP needs a fixed clip norm "
                             "(adaptive clipping is supported in central mode)")
    if privacy.mode is PrivacyMode.LOCAL:
        from core.models import build_model  # torch: imported only when needed
        from core.privacy.local_model import check_local_dp_model

        try:
            check_local_dp_model(build_model(spec.model))
        except (CoreError, PrivacyError) as exc:
            raise InvalidRequest(f"spec.model: {exc}") from None


def _task_privacy(spec: TaskSpec, committed: list[Mapping[str, float]]) -> TaskPrivacy | None:
    try:
        return TaskPrivacy.for_task(spec, committed)
    except ValueError as exc:
        raise InvalidRequest(f"spec.privacy: {exc}") from None


def _plan_privacy(task: _Task) -> PlanPrivacy | None:
    if task.privacy is not None:
        return task.privacy.plan()
    privacy = task.spec.privacy
    if privacy is not None and privacy.mode is PrivacyMode.LOCAL:
        return PlanPrivacy(local=privacy.local)
    return None


def _describe_mismatch(got: list[TensorInfo], expected: list[TensorInfo]) -> str:
    if len(got) != len(expected):
        return f"update has {len(got)} tensors but the model has {len(expected)}"
    for g, e in zip(got, expected, strict=True):
        if g != e:
            return (
                f"tensor {g.name!r} ({g.dtype}{list(g.shape)}) does not match the model's "
                f"{e.name!r} ({e.dtype}{list(e.shape)})"
            )
    return "update tensors do not match the model"


def _check_device_id(device_id: str) -> None:
    if not _DEVICE_ID.match(device_id):
        raise InvalidRequest(
            "device_id must be 1-128 characters of letters, digits and ._:@/- "
            f"(got {device_id[:40]!r})"
        )


def _check_metrics(metrics: Mapping[str, float]) -> None:
    if len(metrics) > _MAX_METRICS:
        raise InvalidRequest(f"at most {_MAX_METRICS} metrics per report, got {len(metrics)}")
    for name, value in metrics.items():
        if not _METRIC_NAME.match(name):
            raise InvalidRequest(f"metric name {name[:40]!r} is not a valid name")
        if not math.isfinite(value):
            raise InvalidRequest(f"metric {name!r} is not finite ({value})")


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:24] or "task"


def _json_dumps(data: object) -> str:
    return json.dumps(data, sort_keys=True)


def _json_loads(text: str) -> dict[str, object]:
    value = json.loads(text)
    assert isinstance(value, dict)
    return value


__all__ = [
    "KeyAdvertisement",
    "MaskedInputRequest",
    "ShareKeysRequest",
    "ShareKeysResponse",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
    "CheckInOutcome",
    "CheckInResult",
    "CoordinatorService",
    "Participation",
    "Plan",
    "ServiceConfig",
    "TaskView",
    "Upload",
    "UpdateHeader",
]
