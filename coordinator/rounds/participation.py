"""The devices' side of a round: check-in (selection answers), the plan, the model, upload
intake, status reports and the secure-aggregation messages. Each call checks who is asking
(the participation token, compared in constant time), hands the content to the round's
selector or aggregator, and lets the round machine take whatever transition is now due.

Not thread-safe (the service's event loop). Time comes from the injected clock.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import random
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from coordinator.rounds.asynchronous import FedBuff
from coordinator.rounds.clock import Clock
from coordinator.rounds.errors import (
    CoordinatorError,
    Duplicate,
    InvalidRequest,
    Late,
    NotSelected,
    TooLarge,
    shown,
)
from coordinator.rounds.evaluation_tasks import EvaluationSetup
from coordinator.rounds.pacing import PACE_MAX_S, CheckInPacer
from coordinator.rounds.round_machine import RoundMachine
from coordinator.rounds.schemas import ReportedSchemas
from coordinator.rounds.secure import SecureRound
from coordinator.rounds.selection import Admission, is_eligible
from coordinator.rounds.shards import ShardPool
from coordinator.rounds.state import OpenRound, RunningTask, Seat, hash_token
from coordinator.rounds.task_setup import plan_privacy
from coordinator.rounds.tasks import Tasks
from coordinator.rounds.upload_checks import check_metrics, update_refusal
from coordinator.rounds.uploads import Receipt, SpooledUpload, Upload
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, Store
from coordinator.storage.records import ModelVersionRecord
from core.evaluation import report_problem
from core.experiments.assignment import stratum_problem
from core.protocol import (
    CheckInOutcome,
    CheckInResult,
    MetricsPolicy,
    Participation,
    Plan,
    SecAggPlan,
    ShardUpload,
    UpdateHeader,
    config_hash,
)
from core.secagg.encoding import MASKED_METRICS
from core.secagg.messages import (
    KeyAdvertisement,
    RingVector,
    ShareKeysResponse,
    Stage,
    UnmaskResponse,
)
from core.shards import ShardMode, UploadTicket, tensors_digest
from core.tensors import TensorInfo
from core.types import DataSchema, DeviceAttributes, ParticipantState, RoundState

log = logging.getLogger(__name__)

_DEVICE_ID = re.compile(r"^[A-Za-z0-9._:@/-]{1,128}$")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


class Participants:
    def __init__(self, store: Store, blobs: FileBlobStore, clock: Clock, tasks: Tasks,
                 machine: RoundMachine, running: dict[str, RunningTask],
                 schemas: ReportedSchemas, *, rng: random.Random,
                 settings: CoordinatorSettings, shards: ShardPool | None = None) -> None:
        self._store = store
        self._shards = shards
        self._schemas = schemas
        self._blobs = blobs
        self._clock = clock
        self._tasks = tasks
        self._machine = machine
        self._running = running
        self._rng = rng
        # Retry jitter needs no CSPRNG, and is on the check-in hot path.
        self._jitter = random.Random(rng.getrandbits(64))
        self._settings = settings
        #: Spreads the "come back after" answers over time (pace steering).
        #: Its horizon is the agent's longest wait: a return promised later would be early.
        self._pacer = CheckInPacer(settings.checkin_pace_per_s, max_s=PACE_MAX_S,
                                   rng=self._jitter)
        #: When the last :meth:`_retry` was moved later by pacing, the time it was moved to
        #: (None: it kept the rules' time); :meth:`check_in` reads it as the promise.
        self._paced_to: float | None = None
        #: Per open round (by round id), the strata its seated devices declared
        #: (:meth:`_keep_stratum`); only experiments with per-stratum splits keep any.
        self._strata: dict[int, dict[str, str]] = {}

    # ------------------------------------------------------------------ check-in and plan

    def check_in(self, device_id: str, attrs: DeviceAttributes, task_id: str | None, *,
                 schema: DataSchema | None = None, declined: frozenset[str] = frozenset(),
                 stratum: str | None = None) -> CheckInResult:
        """Answers a check-in; records the device's data ``schema`` for its population's
        launch checks, and never offers it a task it ``declined``. ``stratum``: the device's
        declared stratum; kept with its seat in an experiment with per-stratum splits (the
        split its report is checked against and counted under), in memory only and for
        the round only. Raises InvalidRequest for a bad device id or stratum.

        With pacing on, a "come back after" that pacing moved later than the rules asked is
        remembered as the device's promised return (:meth:`CheckInPacer.promise`; answers
        the rules gave unchanged promise nothing, so a population under the pace sees no
        difference). A device back before it
        (:meth:`CheckInPacer.early`) is offered to nothing (no selection window, late
        admission or FedBuff seat: it is told to come back at its promised time), any other
        answer it gets waits at least until then, and it is promised nothing new: a device
        ignoring its answers is seen no more often than the honest ones, and cannot trade
        its promise for a shorter one. A device already seated is answered as usual (its
        seat is its own). The device id is the one the transport authenticated (its key's
        proof), so no caller can move another device's promise."""
        _check_device_id(device_id)
        if stratum is not None:
            problem = stratum_problem(stratum)
            if problem is not None:
                raise InvalidRequest(f"stratum: {problem}")
        now = self._clock.now()
        early = self._pacer.early(device_id, now)
        self._paced_to = None
        result = self._check_in(device_id, attrs, task_id, schema=schema, declined=declined,
                                early=early)
        if result.outcome is CheckInOutcome.ACCEPTED and stratum is not None:
            self._keep_stratum(result.task_id, device_id, stratum)
        if early is None:
            if self._paced_to is not None:
                self._pacer.promise(device_id, now, self._paced_to)
            else:
                self._pacer.forget(device_id)
        elif result.outcome is CheckInOutcome.ACCEPTED:
            self._pacer.forget(device_id)
        elif result.outcome in (CheckInOutcome.RETRY_LATER, CheckInOutcome.NO_TASK) \
                and result.retry_after_s < early - now:
            result = dataclasses.replace(result, retry_after_s=early - now)
        return result

    def _keep_stratum(self, task_id: str, device_id: str, stratum: str) -> None:
        """Keeps the stratum of a device seated in ``task_id``'s open round, when the task
        is an experiment with per-stratum splits. The first declaration in a round binds
        (a device cannot switch splits once it knows its arm). Strata of rounds no longer
        open are dropped when a new round's first is kept."""
        task = self._running.get(task_id)
        if task is None or task.round is None or task.evaluation is None \
                or task.evaluation.strata is None:
            return
        round_id = task.round.round_id
        if round_id not in self._strata:
            open_rounds = {t.round.round_id for t in self._running.values()
                           if t.round is not None}
            for stale in [r for r in self._strata if r not in open_rounds]:
                del self._strata[stale]
            self._strata[round_id] = {}
        self._strata[round_id].setdefault(device_id, stratum)

    def _stratum(self, rnd: OpenRound, device_id: str) -> str | None:
        """The stratum ``device_id`` declared when seated in ``rnd``; None: none."""
        return self._strata.get(rnd.round_id, {}).get(device_id)

    def _check_in(self, device_id: str, attrs: DeviceAttributes, task_id: str | None, *,
                  schema: DataSchema | None, declined: frozenset[str],
                  early: float | None) -> CheckInResult:
        now = self._clock.now()
        limits = self._settings
        if schema is not None:
            self._schemas.record(attrs.population, device_id, schema, now)
        if task_id and task_id in declined:
            return CheckInResult(CheckInOutcome.FINISHED, task_id=task_id,
                                 message=f"this device declined task {shown(task_id)}")
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
            if not is_eligible(attrs, task.spec.eligibility, task.spec.population,
                               device_id=device_id):
                return self._retry(
                    CheckInOutcome.NO_TASK, limits.retry_after_max_s,
                    _not_eligible(task_id, task, device_id))
        else:
            candidates = [
                t for t in self._running.values()
                if is_eligible(attrs, t.spec.eligibility, t.spec.population,
                               device_id=device_id)
                and t.task_id not in declined
                and not (t.counts_devices_once and device_id in t.counted_devices)
            ]
            if not candidates:
                return self._retry(
                    CheckInOutcome.NO_TASK, limits.retry_after_max_s,
                    "no running task for this device",
                )
            task = self._rng.choice(candidates)
        if task.counts_devices_once and device_id in task.counted_devices:
            return self._retry(
                CheckInOutcome.NO_TASK, limits.retry_after_max_s,
                f"this device's report already counts in experiment {task.task_id}; each "
                "device counts once", task.task_id)
        self._machine.advance(task, now)
        rnd = task.round
        if rnd is None or rnd.state is RoundState.AGGREGATING:
            return self._retry(CheckInOutcome.RETRY_LATER, limits.retry_after_min_s,
                               "no round is open; come back soon", task.task_id)
        seat = rnd.seats.get(device_id)
        if seat is None and early is not None:
            return self._early(task, early, now)
        if task.fedbuff is not None:
            return self._check_in_async(task, rnd, task.fedbuff, device_id, seat, now)
        if seat is not None:
            if rnd.secure is None and device_id in rnd.reported:
                # Its update counts already: accepted again it would download, train and
                # upload once more, only to be refused as a duplicate.
                return self._retry(
                    CheckInOutcome.RETRY_LATER, rnd.deadline - now,
                    f"this device's update for round {rnd.round_number} is in; come back for "
                    "the next round", task.task_id)
            return self._accepted(task, rnd, seat)
        if rnd.state is RoundState.SELECTING:
            admission = rnd.selector.check_in(device_id, now, len(rnd.seats))
            if admission is Admission.CANDIDATE:
                return self._come_back_at_close(task, rnd, now)
            if admission is Admission.ADMIT and (rnd.secure is None
                                                 or rnd.secure.stage is Stage.ADVERTISE):
                seat = self._machine.admit(task, rnd, [device_id], now)[0]
                self._machine.advance(task, now)
                return self._accepted(task, rnd, seat)
        return self._retry(
            CheckInOutcome.RETRY_LATER, rnd.deadline - now,
            f"round {rnd.round_number} is full; come back for the next round", task.task_id,
        )

    def _check_in_async(self, task: RunningTask, rnd: OpenRound, fedbuff: FedBuff,
                        device_id: str, seat: Seat | None, now: float) -> CheckInResult:
        """FedBuff's admission: a seat at once while fewer than ``max_concurrency`` are in
        flight; one contribution per device per version."""
        if seat is not None and (device_id in rnd.reported or device_id in rnd.errored):
            return self._retry(
                CheckInOutcome.RETRY_LATER, self._settings.retry_after_min_s,
                f"this device already took part in building model version "
                f"{rnd.round_number}; check in again once it is committed", task.task_id)
        if seat is None:
            if not fedbuff.has_free_seat(rnd):
                return self._retry(
                    CheckInOutcome.RETRY_LATER, self._settings.retry_after_min_s,
                    f"all {fedbuff.aggregation.max_concurrency} seats are taken "
                    "(aggregation.max_concurrency); check in again soon", task.task_id)
            seat = self._machine.admit(task, rnd, [device_id], now)[0]
        return self._accepted(task, rnd, seat)

    def plan(self, p: Participation) -> Plan:
        task, rnd, seat = self._seat(p)
        spec = task.spec
        model = self._model_record(task, seat)
        return Plan(
            task_id=task.task_id,
            round_number=seat.round_number,
            model=spec.model,
            model_version=seat.version,
            model_sha256=model.sha256,
            model_size_bytes=model.size_bytes,
            local=spec.local,
            evaluate=seat.evaluate,
            deadline=min(rnd.deadline, seat.deadline),
            max_update_bytes=_max_update_bytes(task),
            max_chunk_bytes=self._settings.max_chunk_bytes,
            update_tensors=list(task.upload_tensors),
            seed=spec.seed,
            secure_aggregation=rnd.secure.plan if rnd.secure is not None else None,
            privacy=plan_privacy(spec, task.privacy),
            metrics=rnd.aggregator.metrics_policy,
            shard_upload=self._shard_upload(task, rnd, seat, p.device_id),
        )

    def _shard_upload(self, task: RunningTask, rnd: OpenRound, seat: Seat, device: str
                      ) -> ShardUpload | None:
        """Where a seat of a sharded round uploads, with its ticket (signed once per seat);
        None in a round whose uploads come here."""
        if rnd.shards is None or seat.shard is None:
            return None
        assert self._shards is not None
        if seat.ticket is None:
            healthy = self._shards.healthy()
            if healthy and seat.shard not in healthy:
                # Its shard stopped answering since the seat was given: another one.
                seat.shard = rnd.shards.assign(device, healthy)
            privacy = task.privacy
            seat.ticket = self._shards.sign(UploadTicket(
                task_id=task.task_id, round_id=rnd.round_id, round_number=seat.round_number,
                device_id=device, shard=seat.shard, values=task.model.size,
                mode=rnd.shards.mode, weight_cap=task.spec.robustness.weight_cap,
                clip_norm=privacy.clip if rnd.shards.mode is ShardMode.CLIPPED_SUM
                and privacy is not None else 0.0,
                max_update_l2_norm=task.spec.robustness.max_update_l2_norm,
                clear_metrics=rnd.aggregator.metrics_policy is MetricsPolicy.CLEAR,
                adaptive_clipping=privacy is not None and privacy.adaptive is not None,
                deadline=min(rnd.deadline, seat.deadline),
                max_chunk_bytes=self._settings.max_chunk_bytes,
                max_num_examples=self._settings.max_num_examples,
                tensors=tensors_digest(task.upload_tensors)))
        return ShardUpload(self._shards.addresses[seat.shard], seat.ticket)

    def model(self, p: Participation, version: int) -> ModelVersionRecord:
        task, _, seat = self._seat(p)
        if version not in (0, seat.version):
            raise InvalidRequest(
                f"this round trains model version {seat.version}, not {version}"
            )
        return self._model_record(task, seat)

    def _model_record(self, task: RunningTask, seat: Seat) -> ModelVersionRecord:
        """The version ``seat`` trains on: the current one, except for an asynchronous seat
        carried over from an earlier version."""
        if seat.version == task.model.version:
            return task.model.record
        return self._store.get_model_version(task.task_id, seat.version)

    # ------------------------------------------------------------------ clear uploads

    def begin_upload(self, header: UpdateHeader) -> Upload:
        """Checks an update's header; the caller then streams chunks into the returned Upload
        (unless it is a replay: the same upload retried after it finished, which carries
        the first attempt's answer and takes no data).

        Raises:
            InvalidRequest: a malformed header (or upload id).
            Duplicate: the device already reported (with another upload), or has another
                upload open.
            TooLarge: the declared size is over the task's limit.
            NotSelected, Late: as for any device call.
        """
        if header.upload_id and not _UPLOAD_ID.fullmatch(header.upload_id):
            raise InvalidRequest(f"upload_id must be 16-64 characters of A-Z, a-z, 0-9, _ and "
                                 f"-, got {shown(header.upload_id)}")
        replay = self._receipt(header)
        if replay is not None:
            return Upload(header, 0, None, replay=replay)
        task, rnd, seat = self._seat(header.participation)
        device = header.participation.device_id
        if seat.shard is not None and self._shards is not None:
            raise InvalidRequest(
                f"round {rnd.round_number}'s updates go to aggregator shard "
                f"{self._shards.addresses[seat.shard]} (the plan's shard_upload), not here")
        rnd.aggregator.check_upload(header.metrics)
        if device in rnd.reported:
            raise Duplicate(f"device {shown(device)} already reported for round "
                            f"{rnd.round_number}")
        if device in rnd.errored:
            raise Late(f"device {shown(device)} is out of round {rnd.round_number}: its update "
                       "was refused, it reported an error, or its seat expired")
        open_upload = rnd.uploading.get(device)
        if open_upload is not None:
            if not header.upload_id or open_upload.header.upload_id != header.upload_id:
                raise Duplicate(f"device {shown(device)} already has an upload in progress")
            # The same upload retried while its first attempt still looks open (the client
            # gave up on it): the retry replaces it, and the first can no longer count.
            open_upload.superseded = True
        limit = _max_update_bytes(task)
        if header.total_bytes > limit:
            raise TooLarge(
                f"update of {header.total_bytes} bytes exceeds the task's limit of {limit} "
                "bytes (max_update_bytes)"
            )
        expected = task.upload_tensors
        if list(header.tensors) != expected:
            raise InvalidRequest(_describe_mismatch(header.tensors, expected))
        if header.total_bytes != task.upload_nbytes:
            raise InvalidRequest(
                f"header declares {header.total_bytes} bytes but the update of this model is "
                f"{task.upload_nbytes} bytes"
            )
        max_examples = self._settings.max_num_examples
        if not 1 <= header.num_examples <= max_examples:
            raise InvalidRequest(
                f"num_examples must be between 1 and {max_examples}, got {header.num_examples}"
            )
        if not _SHA256.fullmatch(header.sha256):
            raise InvalidRequest("sha256 must be the 64 hex digits of the update's SHA-256, "
                                 f"got {len(header.sha256)} characters")
        check_metrics(header.metrics)
        path = self._blobs.spool_path(f"{task.task_id}-{rnd.round_id}-{secrets.token_hex(8)}.upd")
        spool = SpooledUpload(
            path, declared_bytes=header.total_bytes, sha256=header.sha256,
            max_chunk_bytes=self._settings.max_chunk_bytes,
        )
        upload = Upload(header, rnd.round_id, spool)
        rnd.uploading[device] = upload
        return upload

    def abort_upload(self, upload: Upload) -> None:
        """Drops an upload's data and its place in the round; idempotent, and harmless after
        :meth:`finish_upload`."""
        upload.discard()
        task = self._running.get(upload.header.participation.task_id)
        rnd = task.round if task is not None else None
        device = upload.header.participation.device_id
        if rnd is not None and rnd.round_id == upload.round_id and (
                rnd.uploading.get(device) is upload):
            del rnd.uploading[device]

    def finish_upload(self, upload: Upload) -> str:
        """Counts a verified update (:meth:`Upload.verify`, done here when the transport has
        not) into the round's aggregate, and returns the answer for the device. Call it only
        once the upload's stream has ended successfully: an update counts exactly when this
        returns.

        A replay gets the first attempt's answer. Raises the errors of :meth:`begin_upload`,
        InvalidRequest for a size or hash mismatch, non-finite values or an L2 norm over
        the task's ``robustness.max_update_l2_norm`` (the last two are remembered for
        retries, and the device is out of the round), and Late if the round closed
        meanwhile. The upload's spool file is removed in every case.
        """
        if upload.replay is not None:
            first = upload.replay.refusal
            if first is not None:
                raise type(first)(*first.args)
            return "update accepted (a retry of an upload that was accepted; counted once)"
        try:
            norm = upload.verify()
            p = upload.header.participation
            task, rnd, seat = self._seat(p)
            device = p.device_id
            if upload.superseded:
                raise Late("a retry of this upload replaced it")
            # Not in the round's uploads: begun in an attempt that was since closed (an
            # asynchronous seat's upload is carried to the next version with the seat).
            if rnd.uploading.get(device) is not upload:
                raise Late(f"round {rnd.round_number} was restarted while the update was sent")
            if device in rnd.reported:
                raise Duplicate(f"device {shown(device)} already reported for round "
                                f"{rnd.round_number}")
            if task.evaluation is None:
                refusal = update_refusal(norm, task.spec.robustness.max_update_l2_norm)
            else:
                assert upload.spool is not None
                refusal = _report_refusal(task.evaluation, upload.spool.path, device,
                                          self._stratum(rnd, device))
            if refusal is not None:
                self._store.set_participant_state(
                    rnd.round_id, device, ParticipantState.REJECTED, now=self._clock.now()
                )
                rnd.errored.add(device)
                self._remember(seat, upload, refusal)
                raise refusal
            stored = rnd.aggregator.check_upload(upload.header.metrics)
            scale = 1.0
            if task.fedbuff is not None:
                try:
                    scale = task.fedbuff.take_update(rnd, seat, task.model.version)
                except Late as late:
                    self._store.set_participant_state(
                        rnd.round_id, device, ParticipantState.REJECTED, now=self._clock.now()
                    )
                    rnd.errored.add(device)
                    self._remember(seat, upload, late)
                    raise
            clear = rnd.aggregator.metrics_policy is MetricsPolicy.CLEAR
            assert upload.spool is not None
            # Recorded first: an update counts in the aggregate only once the database says so.
            self._store.set_participant_state(
                rnd.round_id, device, ParticipantState.REPORTED, now=self._clock.now(),
                num_examples=upload.header.num_examples if clear else 0, metrics=stored,
            )
            rnd.aggregator.add_upload(upload.spool.path, upload.header.num_examples,
                                      upload.header.metrics, scale=scale)
            if task.evaluation is not None and task.evaluation.strata is not None:
                stratum = self._stratum(rnd, device)
                version = task.evaluation.layout.plan.version_for(device, stratum)
                assert version is not None  # an experiment's plan assigns every device
                task.evaluation.strata.count(stratum, version)
            rnd.reported.add(device)
            task.any_accepted = True
            self._remember(seat, upload, None)
        finally:
            self.abort_upload(upload)
        self._machine.advance(task, self._clock.now())
        return "update accepted"

    def _receipt(self, header: UpdateHeader) -> Receipt | None:
        """The answer of a finished upload that ``header`` retries (same device, attempt,
        upload id and hash), from the round or the attempt that closed last; None if it
        retries none."""
        p = header.participation
        task = self._running.get(p.task_id)
        if not header.upload_id or task is None:
            return None
        rnd = task.round
        for seats in (rnd.seats if rnd is not None else {}, task.closed_seats):
            seat = seats.get(p.device_id)
            if seat is None or seat.receipt is None or not hmac.compare_digest(
                    seat.token_hash, hash_token(p.token)):
                continue
            receipt = seat.receipt
            if receipt.upload_id != header.upload_id:
                return None
            if receipt.sha256 != header.sha256.lower():
                raise Duplicate(f"upload {header.upload_id} was already answered for another "
                                "update (its sha256 differs); an upload id names one update")
            return receipt
        return None

    @staticmethod
    def _remember(seat: Seat, upload: Upload, refusal: CoordinatorError | None) -> None:
        if upload.header.upload_id:
            seat.receipt = Receipt(upload.header.upload_id, upload.header.sha256.lower(),
                                   refusal)

    def report_status(self, p: Participation, metrics: Mapping[str, float], error: str, *,
                      decline: bool = False) -> None:
        """Evaluation-only metrics, or an error that keeps the device out of this round;
        with ``decline`` the device cannot run the task at all, and its reason is counted
        (the round machine then fails a task that no device can run)."""
        task, rnd, _ = self._seat(p)
        check_metrics(metrics)
        if decline and not error:
            raise InvalidRequest("a decline needs its reason in error")
        if error:
            if p.device_id in rnd.reported:
                raise Duplicate("this device's update was already accepted in this round; "
                                "an error reported after it changes nothing")
            if p.device_id in rnd.errored:
                return  # reported already: a retry of the same report
            log.info("device %s %s round %s: %s", p.device_id,
                     "declined the task in" if decline else "could not take part in",
                     rnd.round_number, error[:200])
            rnd.errored.add(p.device_id)
            if decline:
                task.declines.record(p.device_id, error)
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
        # Honest neighbours refuse a peer whose configuration hash is not theirs, which would
        # abort the round for everyone: a device advertising another round's (or a made-up)
        # hash is refused instead, alone (found by fuzzing).
        secure.advertise(p.device_id, message, config_hash(self.plan(p)))
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
        task.any_accepted = True
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

    def largest_masked_input_bytes(self) -> int:
        """An upper bound on the masked input of any running secure-aggregation task (its
        model's parameters, the adaptive-clipping bit, the masked metrics and the weight, in
        ring elements); 0 when no such task runs."""
        largest = 0
        for task in self._running.values():
            if task.secagg is not None:
                values = task.upload_nbytes // 4 + 1 + len(MASKED_METRICS) + 1
                largest = max(largest, values * (task.secagg.ring_bits // 8))
        return largest

    def most_secagg_neighbours(self) -> int:
        """The most neighbours a device has in any running secure-aggregation task (the
        ciphertexts and shares it sends); 0 when no such task runs."""
        return max((t.secagg.neighbours for t in self._running.values()
                    if t.secagg is not None), default=0)

    # ------------------------------------------------------------------ who is asking

    def _seat(self, p: Participation) -> tuple[RunningTask, OpenRound, Seat]:
        task = self._running.get(p.task_id)
        if task is None:
            record = self._tasks.record(p.task_id)
            raise Late(f"task {shown(p.task_id)} is {record.state.value}; check in again")
        rnd = task.round
        seat = rnd.seats.get(p.device_id) if rnd is not None else None
        # A seat's round is the open one's, or (asynchronous) the version it was carried from.
        admitted_in = seat.round_number if seat is not None else (
            rnd.round_number if rnd is not None else None)
        if rnd is None or admitted_in != p.round_number or rnd.state not in (
            RoundState.SELECTING, RoundState.TRAINING
        ):
            raise Late(
                f"round {p.round_number} of task {shown(p.task_id)} is closed; check in again"
            )
        old = task.closed_seats.get(p.device_id)
        if seat is None and old is not None and hmac.compare_digest(
            old.token_hash, hash_token(p.token)
        ):
            raise Late(f"the attempt of round {p.round_number} this device joined was closed; "
                       "check in again")
        if seat is None or not hmac.compare_digest(seat.token_hash, hash_token(p.token)):
            raise NotSelected(
                f"device {shown(p.device_id)} is not selected for round {p.round_number} of "
                f"task {shown(p.task_id)} (or its participation token is wrong)"
            )
        return task, rnd, seat

    def _secure_seat(self, p: Participation) -> tuple[RunningTask, OpenRound, SecureRound]:
        task, rnd, _ = self._seat(p)
        if rnd.secure is None:
            raise InvalidRequest(f"task {shown(p.task_id)} does not use secure aggregation")
        return task, rnd, rnd.secure

    @staticmethod
    def _early(task: RunningTask, promised: float, now: float) -> CheckInResult:
        """The answer to a device back before its promised return: offered to nothing, it
        is told that time again (pace steering; :meth:`check_in`)."""
        return CheckInResult(
            CheckInOutcome.RETRY_LATER, task_id=task.task_id, retry_after_s=promised - now,
            message=f"this device was told to come back later; it is {promised - now:.1f} s "
                    "early, and is offered no seat before then")

    def _accepted(self, task: RunningTask, rnd: OpenRound, seat: Seat) -> CheckInResult:
        return CheckInResult(
            CheckInOutcome.ACCEPTED, task_id=task.task_id, round_number=rnd.round_number,
            token=seat.token, message=f"selected for round {rnd.round_number}",
        )

    def _come_back_at_close(self, task: RunningTask, rnd: OpenRound, now: float
                            ) -> CheckInResult:
        """A candidate of the selection window comes back once it closed, to hear whether
        it was drawn. Never paced (it may be drawn). Without pacing it is told as every
        answer is (within the bounds, jittered). With pacing it is told the close itself
        (one check-in per window, not one per ``retry_after_max_s``) plus a uniform spread
        of (the devices the window will have seen, extrapolated from those so far) / pace:
        the candidates come back at about the pace they came in, instead of all at the
        close, where they would queue everyone's calls (and then upload at once). The drawn
        ones learn of their seat up to that much later, at most a quarter of the time from
        the close to the round's deadline (the rest is left for training)."""
        message = "selection window open; check in again when it closes"
        after = rnd.selector.window_closes - now + 0.05
        pace = self._pacer.rate_per_s
        if pace <= 0:
            return self._retry(CheckInOutcome.RETRY_LATER, after, message, task.task_id,
                               paced=False)
        selector = rnd.selector
        closes = selector.window_closes
        elapsed = now - (closes - selector.window_s)
        expected = selector.seen * selector.window_s / max(elapsed, 1.0, selector.window_s / 10)
        spread = max(0.0, min(expected / pace, (rnd.deadline - closes) / 4))
        after = max(after, self._settings.retry_after_min_s) + self._jitter.uniform(0, spread)
        self._pacer.book(now + after)
        return CheckInResult(CheckInOutcome.RETRY_LATER, task_id=task.task_id,
                             retry_after_s=after, message=message)

    def _retry(self, outcome: CheckInOutcome, after_s: float, message: str,
               task_id: str = "", *, paced: bool = True) -> CheckInResult:
        """A "come back after" answer: ``after_s`` within the settings' bounds, jittered,
        and (``paced``) moved later while the connected population would otherwise return
        faster than the coordinator's pace (:mod:`coordinator.rounds.pacing`)."""
        lo, hi = self._settings.retry_after_min_s, self._settings.retry_after_max_s
        after = min(max(after_s, lo), hi) * self._jitter.uniform(1.0, 1.2)
        if paced:
            now = self._clock.now()
            at = self._pacer.come_back_at(now, now + after)
            if at > now + after:
                self._paced_to = at
                after = at - now
        return CheckInResult(outcome, task_id=task_id, retry_after_s=after, message=message)


def _report_refusal(setup: EvaluationSetup, path: Path, device: str, stratum: str | None
                   ) -> InvalidRequest | None:
    """Why an evaluation report must not count (bounds, consistency, in an experiment the
    device's arm under its stratum's split); None if it may."""
    problem = report_problem(setup.layout, np.fromfile(path, dtype="<f4"), device_id=device,
                             stratum=stratum)
    if problem is None:
        return None
    return InvalidRequest(f"evaluation report refused: {problem}")


def _max_update_bytes(task: RunningTask) -> int:
    if task.evaluation is not None:
        return task.upload_nbytes
    return task.spec.max_update_bytes or task.model.nbytes


def _describe_mismatch(got: list[TensorInfo], expected: list[TensorInfo]) -> str:
    if len(got) != len(expected):
        return f"update has {len(got)} tensors but the model has {len(expected)}"
    for g, e in zip(got, expected, strict=True):
        if g != e:
            return (f"tensor {_describe_tensor(g)} does not match the model's "
                    f"{_describe_tensor(e)}")
    return "update tensors do not match the model"


def _describe_tensor(t: TensorInfo) -> str:
    """A tensor as an error shows it (its name and shape may come from a client)."""
    shape = str(list(t.shape)) if len(t.shape) <= 8 else f"[{len(t.shape)} dimensions]"
    return f"{shown(t.name)} ({t.dtype}{shape})"


def _not_eligible(task_id: str, task: RunningTask, device_id: str) -> str:
    """Why a device may not join ``task``: another experiment arm's devices train this
    task (it always will be: the arm is a hash of its id; checking in without a task id
    offers it its own arm's task), or its population or attributes do not match."""
    eligibility = task.spec.eligibility
    if eligibility.arm is not None and not eligibility.arm.admits(device_id):
        return (f"device is not eligible for task {task_id}: the task trains only the "
                f"devices of experiment arm {eligibility.arm.index} (eligibility.arm), and "
                f"this device is in another arm")
    return (f"device is not eligible for task {task_id} "
            f"(population {task.spec.population!r}, {eligibility})")


def _check_device_id(device_id: str) -> None:
    if not _DEVICE_ID.match(device_id):
        raise InvalidRequest(
            "device_id must be 1-128 characters of letters, digits and ._:@/- "
            f"(got {shown(device_id)})"
        )
