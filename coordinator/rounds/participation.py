"""The devices' side of a round: check-in (selection answers), the plan, the model, upload
intake, status reports and the secure-aggregation messages. Each call checks who is asking
(the participation token, compared in constant time), hands the content to the round's
selector or aggregator, and lets the round machine take whatever transition is now due.

Not thread-safe (the service's event loop). Time comes from the injected clock.
"""

from __future__ import annotations

import hmac
import logging
import math
import random
import re
import secrets
from collections.abc import Mapping

from coordinator.rounds.clock import Clock
from coordinator.rounds.errors import Duplicate, InvalidRequest, Late, NotSelected, TooLarge
from coordinator.rounds.round_machine import RoundMachine
from coordinator.rounds.secure import SecureRound
from coordinator.rounds.selection import Admission, is_eligible
from coordinator.rounds.state import OpenRound, RunningTask, Seat, hash_token
from coordinator.rounds.task_setup import plan_privacy
from coordinator.rounds.tasks import Tasks
from coordinator.rounds.uploads import SpooledUpload, all_finite
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, Store
from coordinator.storage.records import ModelVersionRecord
from core.protocol import (
    CheckInOutcome,
    CheckInResult,
    MetricsPolicy,
    Participation,
    Plan,
    SecAggPlan,
    UpdateHeader,
)
from core.secagg.messages import (
    KeyAdvertisement,
    RingVector,
    ShareKeysResponse,
    Stage,
    UnmaskResponse,
)
from core.tensors import TensorInfo
from core.types import DeviceAttributes, ParticipantState, RoundState

log = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_METRICS = 32
#: Largest magnitude of a reported metric: weighted sums of them stay finite.
_MAX_METRIC_VALUE = 1e9
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class Upload:
    """An update being received; call :meth:`Participants.finish_upload` or
    :meth:`Participants.abort_upload` with it."""

    def __init__(self, header: UpdateHeader, spool: SpooledUpload, round_id: int) -> None:
        self.header = header
        self.spool = spool
        self.round_id = round_id

    def write(self, chunk: bytes) -> None:
        self.spool.write(chunk)


class Participants:
    def __init__(self, store: Store, blobs: FileBlobStore, clock: Clock, tasks: Tasks,
                 machine: RoundMachine, running: dict[str, RunningTask], *,
                 rng: random.Random, settings: CoordinatorSettings) -> None:
        self._store = store
        self._blobs = blobs
        self._clock = clock
        self._tasks = tasks
        self._machine = machine
        self._running = running
        self._rng = rng
        # Retry jitter needs no CSPRNG, and is on the check-in hot path.
        self._jitter = random.Random(rng.getrandbits(64))
        self._settings = settings

    # ------------------------------------------------------------------ check-in and plan

    def check_in(self, device_id: str, attrs: DeviceAttributes, task_id: str | None
                 ) -> CheckInResult:
        _check_device_id(device_id)
        now = self._clock.now()
        limits = self._settings
        if task_id:
            # The hot path: running tasks are answered from memory, without the database.
            task = self._running.get(task_id)
            if task is None:
                record = self._tasks.record(task_id)
                if record.state.is_final:
                    return CheckInResult(
                        CheckInOutcome.FINISHED, task_id=task_id,
                        message=f"task {task_id} is {record.state.value}",
                    )
                return self._retry(CheckInOutcome.NO_TASK, 1.0, f"task {task_id} is not loaded")
            if not is_eligible(attrs, task.spec.eligibility, task.spec.population):
                return self._retry(
                    CheckInOutcome.NO_TASK, limits.retry_after_max_s,
                    f"device is not eligible for task {task_id} "
                    f"(population {task.spec.population!r}, {task.spec.eligibility})",
                )
        else:
            candidates = [
                t for t in self._running.values()
                if is_eligible(attrs, t.spec.eligibility, t.spec.population)
            ]
            if not candidates:
                return self._retry(
                    CheckInOutcome.NO_TASK, limits.retry_after_max_s,
                    "no running task for this device",
                )
            task = self._rng.choice(candidates)
        self._machine.advance(task, now)
        rnd = task.round
        if rnd is None or rnd.state is RoundState.AGGREGATING:
            return self._retry(CheckInOutcome.RETRY_LATER, limits.retry_after_min_s,
                               "no round is open; come back soon", task.task_id)
        seat = rnd.seats.get(device_id)
        if seat is not None:
            return self._accepted(task, rnd, seat)
        if rnd.state is RoundState.SELECTING:
            admission = rnd.selector.check_in(device_id, now, len(rnd.seats))
            if admission is Admission.CANDIDATE:
                return self._retry(
                    CheckInOutcome.RETRY_LATER, rnd.selector.window_closes - now + 0.05,
                    "selection window open; check in again when it closes", task.task_id,
                )
            if admission is Admission.ADMIT and (rnd.secure is None
                                                 or rnd.secure.stage is Stage.ADVERTISE):
                seat = self._machine.admit(task, rnd, [device_id], now)[0]
                self._machine.advance(task, now)
                return self._accepted(task, rnd, seat)
        return self._retry(
            CheckInOutcome.RETRY_LATER, rnd.deadline - now,
            f"round {rnd.round_number} is full; come back for the next round", task.task_id,
        )

    def plan(self, p: Participation) -> Plan:
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
            max_update_bytes=_max_update_bytes(task),
            max_chunk_bytes=self._settings.max_chunk_bytes,
            update_tensors=list(task.model.infos),
            seed=spec.seed,
            secure_aggregation=rnd.secure.plan if rnd.secure is not None else None,
            privacy=plan_privacy(spec, task.privacy),
            metrics=rnd.aggregator.metrics_policy,
        )

    def model(self, p: Participation, version: int) -> ModelVersionRecord:
        task, _, _ = self._seat(p)
        if version not in (0, task.model.version):
            raise InvalidRequest(
                f"this round trains model version {task.model.version}, not {version}"
            )
        return task.model.record

    # ------------------------------------------------------------------ clear uploads

    def begin_upload(self, header: UpdateHeader) -> Upload:
        """Checks an update's header; the caller then streams chunks into the returned Upload."""
        task, rnd, _ = self._seat(header.participation)
        device = header.participation.device_id
        rnd.aggregator.check_upload(header.metrics)
        if device in rnd.reported:
            raise Duplicate(f"device {device} already reported for round {rnd.round_number}")
        if device in rnd.uploading:
            raise Duplicate(f"device {device} already has an upload in progress")
        limit = _max_update_bytes(task)
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
        max_examples = self._settings.max_num_examples
        if not 1 <= header.num_examples <= max_examples:
            raise InvalidRequest(
                f"num_examples must be between 1 and {max_examples}, got {header.num_examples}"
            )
        if not _SHA256.fullmatch(header.sha256):
            raise InvalidRequest("sha256 must be the 64 hex digits of the update's SHA-256, "
                                 f"got {len(header.sha256)} characters")
        _check_metrics(header.metrics)
        path = self._blobs.spool_path(f"{task.task_id}-{rnd.round_id}-{secrets.token_hex(8)}.upd")
        spool = SpooledUpload(
            path, declared_bytes=header.total_bytes, sha256=header.sha256,
            max_chunk_bytes=self._settings.max_chunk_bytes,
        )
        rnd.uploading.add(device)
        return Upload(header, spool, rnd.round_id)

    def abort_upload(self, upload: Upload) -> None:
        upload.spool.discard()
        task = self._running.get(upload.header.participation.task_id)
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
        self._machine.advance(task, self._clock.now())

    def report_status(self, p: Participation, metrics: Mapping[str, float], error: str) -> None:
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
            self._machine.advance(task, self._clock.now())

    # ------------------------------------------------------------------ secure aggregation

    def secagg_advertise(self, p: Participation, message: KeyAdvertisement) -> None:
        task, _, secure = self._secure_seat(p)
        secure.advertise(p.device_id, message)
        self._machine.advance(task, self._clock.now())

    def secagg_share_keys(self, p: Participation, message: ShareKeysResponse) -> None:
        task, _, secure = self._secure_seat(p)
        secure.share_keys(p.device_id, message)
        self._machine.advance(task, self._clock.now())

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
        self._machine.advance(task, self._clock.now())

    def secagg_unmask(self, p: Participation, message: UnmaskResponse) -> None:
        task, _, secure = self._secure_seat(p)
        secure.unmask(p.device_id, message)
        self._machine.advance(task, self._clock.now())

    def secagg_reply(self, p: Participation, after: Stage) -> object | None:
        """The device's message for the stage after ``after`` once ``after`` closed; None
        while it is open. Raises Late once the device or the round is out of the protocol."""
        task = self._running.get(p.task_id)
        if task is not None:
            self._machine.advance(task, self._clock.now())
        _, _, secure = self._secure_seat(p)
        return secure.reply(p.device_id, after)

    def secagg_plan(self, p: Participation) -> SecAggPlan:
        """This round's secure-aggregation parameters, for a seated device."""
        return self._secure_seat(p)[2].plan

    # ------------------------------------------------------------------ who is asking

    def _seat(self, p: Participation) -> tuple[RunningTask, OpenRound, Seat]:
        task = self._running.get(p.task_id)
        if task is None:
            record = self._tasks.record(p.task_id)
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
            old.token_hash, hash_token(p.token)
        ):
            raise Late(f"the attempt of round {p.round_number} this device joined was closed; "
                       "check in again")
        if seat is None or not hmac.compare_digest(seat.token_hash, hash_token(p.token)):
            raise NotSelected(
                f"device {p.device_id!r} is not selected for round {p.round_number} of task "
                f"{p.task_id} (or its participation token is wrong)"
            )
        return task, rnd, seat

    def _secure_seat(self, p: Participation) -> tuple[RunningTask, OpenRound, SecureRound]:
        task, rnd, _ = self._seat(p)
        if rnd.secure is None:
            raise InvalidRequest(f"task {p.task_id} does not use secure aggregation")
        return task, rnd, rnd.secure

    def _accepted(self, task: RunningTask, rnd: OpenRound, seat: Seat) -> CheckInResult:
        return CheckInResult(
            CheckInOutcome.ACCEPTED, task_id=task.task_id, round_number=rnd.round_number,
            token=seat.token, message=f"selected for round {rnd.round_number}",
        )

    def _retry(self, outcome: CheckInOutcome, after_s: float, message: str,
               task_id: str = "") -> CheckInResult:
        lo, hi = self._settings.retry_after_min_s, self._settings.retry_after_max_s
        after = min(max(after_s, lo), hi) * self._jitter.uniform(1.0, 1.2)
        return CheckInResult(outcome, task_id=task_id, retry_after_s=after, message=message)


def _max_update_bytes(task: RunningTask) -> int:
    return task.spec.max_update_bytes or task.model.nbytes


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
        if abs(value) > _MAX_METRIC_VALUE:
            raise InvalidRequest(f"metric {name!r} is {value:.3g}; metrics are at most "
                                 f"{_MAX_METRIC_VALUE:g} in magnitude")
