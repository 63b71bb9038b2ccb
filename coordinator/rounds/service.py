"""The coordinator's domain service: one object the gRPC servicers call, composed of the parts
that each own one concern (see the README's architecture):

=========================  ===============================================================
:mod:`.tasks`              create, read, list, cancel tasks; load them after a restart
:mod:`.round_machine`      the round state machine: open, select, train, release, commit
:mod:`.asynchronous`       FedBuff: seats at check-in, staleness weights, commit every K
:mod:`.selection`          the Selector: the one place a cohort is drawn (and recorded)
:mod:`.aggregators`        plain, central-DP and secure aggregation behind one protocol
:mod:`.commits`            commits and server-side evaluation, off the event loop
:mod:`.participation`      the devices' calls: check-in, plan, uploads, SecAgg messages
:mod:`.models`             model versions: files and their records
:mod:`.task_setup`         what a spec implies at run time; refusals at launch
=========================  ===============================================================

Thread-safety: not thread-safe. The gRPC transport calls it from one asyncio event loop; the
only other thread is the commit worker, which touches files, never this state. Time comes
from the injected clock; randomness from the injected ``random.Random``
(``random.SystemRandom`` in production).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from coordinator.observability.events import EventHub, EventKind, rejection_reason
from coordinator.observability.observed_store import ObservedStore
from coordinator.rounds.clock import Clock
from coordinator.rounds.commits import CommitWorker, InlineCommits, ThreadCommits
from coordinator.rounds.errors import CoordinatorError
from coordinator.rounds.evaluation import ServerEvaluator
from coordinator.rounds.launch import check_pace
from coordinator.rounds.models import ModelRepository
from coordinator.rounds.participation import Participants
from coordinator.rounds.round_machine import RoundMachine
from coordinator.rounds.schemas import ReportedSchemas
from coordinator.rounds.shards import ShardPool
from coordinator.rounds.state import RunningTask
from coordinator.rounds.tasks import BuiltTask, TaskLaunch, Tasks, TaskView
from coordinator.rounds.uploads import Upload
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, Store
from coordinator.storage.deferred import DeferredParticipantWrites
from coordinator.storage.records import ModelVersionRecord, RoundRecord
from core.aggregation.server_optimizers import apply_server_optimizer
from core.privacy.errors import InsecureNoiseError
from core.privacy.noise import NoiseSource
from core.protocol import (
    CheckInOutcome,
    CheckInResult,
    Participation,
    Plan,
    SecAggPlan,
    UpdateHeader,
)
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
from core.types import (
    DataSchema,
    DeviceAttributes,
    ServerOptimizer,
    ServerOptimizerKind,
    TaskSpec,
)


class CoordinatorService:
    def __init__(
        self,
        store: Store,
        blobs: FileBlobStore,
        clock: Clock,
        *,
        rng: random.Random | None = None,
        settings: CoordinatorSettings | None = None,
        noise: NoiseSource | None = None,
        commits: CommitWorker | None = None,
        events: EventHub | None = None,
        shards: ShardPool | None = None,
    ) -> None:
        """``noise`` is where differential-privacy noise comes from (default: the CSPRNG).
        ``commits`` runs commits (default: a worker thread when
        ``settings.commit_in_background``, else in line). ``events`` receives an event for
        every device and round transition (:mod:`coordinator.observability.events`; default:
        a hub without sinks, :attr:`events`, to which sinks may be added). ``shards``: the
        aggregator shards the uploads of sharded tasks go to (:mod:`coordinator.rounds.
        shards`); None: every upload comes here.

        Raises:
            InsecureNoiseError: a seeded ``noise`` without ``settings.allow_seeded_noise``.
        """
        self.settings = settings or CoordinatorSettings()
        noise = noise if noise is not None else NoiseSource.secure()
        if not noise.is_secure and not self.settings.allow_seeded_noise:
            raise InsecureNoiseError(
                "the coordinator needs a cryptographically secure noise source for "
                "differential privacy; a seeded one is accepted only with "
                "CoordinatorSettings(allow_seeded_noise=True), in tests and simulations")
        rng = rng if rng is not None else random.SystemRandom()
        if commits is None:
            commits = ThreadCommits() if self.settings.commit_in_background else InlineCommits()
        self._clock = clock
        self._blobs = blobs
        self.events = events if events is not None else EventHub()
        # Events are emitted as the round logic calls (outside); the participant writes are
        # grouped inside, once the transport asks for it (defer_participant_writes).
        self._writes = DeferredParticipantWrites(store)
        store = ObservedStore(self._writes, self.events, clock.now)
        self._progress_listeners: list[Callable[[], None]] = []
        running: dict[str, RunningTask] = {}
        evaluator = ServerEvaluator()
        self._models = ModelRepository(store, blobs)
        self._machine = RoundMachine(store, self._models, evaluator, running, rng=rng,
                                     settings=self.settings, noise=noise, commits=commits,
                                     progress=self._progress, shards=shards)
        schemas = ReportedSchemas(window_s=self.settings.schema_window_s)
        self._tasks = Tasks(store, self._models, evaluator, self._machine, running, schemas)
        self._participants = Participants(store, blobs, clock, self._tasks, self._machine,
                                          running, schemas, rng=rng, settings=self.settings,
                                          shards=shards)
        self._shards = shards

    def add_progress_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` is called whenever a secure-aggregation stage closes or a round
        ends, so transports can wake the devices waiting for it."""
        self._progress_listeners.append(listener)

    def _progress(self) -> None:
        for listener in self._progress_listeners:
            listener()

    # ------------------------------------------------------------------ life cycle

    def recover(self) -> None:
        """Loads running tasks after a (re)start; open rounds from before are failed and redone."""
        self._blobs.clear_spool()
        self._tasks.recover(self._clock.now())

    def warm_up(self) -> None:
        """Pays torch's one-time optimizer start-up (about 2 s: torch._dynamo's import)
        before serving, instead of inside the first round's aggregation."""
        for kind in ServerOptimizerKind:
            apply_server_optimizer(
                {"w": np.zeros(1, np.float32)}, {"w": np.zeros(1, np.float32)},
                ServerOptimizer(kind=kind), None,
            )

    def tick(self) -> None:
        """Lands finished commits and drives deadlines and selection windows; call it
        periodically (e.g. every 50 ms). Writes the participant writes that were queued at
        the previous tick already and still are."""
        self._machine.tick(self._clock.now())
        self._writes.flush_stale()

    def close(self) -> None:
        """Waits for commits in flight (their files are written; unrecorded rounds are redone
        at the next start) and writes the queued participant writes."""
        self._machine.close()
        self._writes.flush()
        if self._shards is not None:
            self._shards.close()

    # ------------------------------------------------------------------ group commit

    def defer_participant_writes(self) -> None:
        """From now on admissions, reports and errors of devices are queued and written
        together (:class:`~coordinator.storage.deferred.DeferredParticipantWrites`): the
        caller that answers a device must first see :meth:`participant_writes_durable` of
        :meth:`participant_writes_queued` (read after the service call) come true, calling
        :meth:`flush_participant_writes` (blocking I/O, thread-safe) as needed. Without this
        call every write is its own transaction, done before the service call returns."""
        self._writes.defer()

    def participant_writes_queued(self) -> int:
        """Sequence number of the last participant write queued."""
        return self._writes.queued_seq

    def participant_writes_durable(self, seq: int) -> bool:
        """True once every participant write up to ``seq`` is in the database."""
        return self._writes.flushed_through(seq)

    def flush_participant_writes(self) -> None:
        """Writes the queued participant writes in one transaction (blocking I/O; safe off
        the event loop). Raises StorageError if the database fails (they stay queued)."""
        self._writes.flush()

    # ------------------------------------------------------------------ admin

    def create_task(self, spec: TaskSpec) -> TaskView:
        """Checks and starts a task; the view's ``launch_checks`` say what was checked.
        Raises InvalidRequest or DataMismatch (see :meth:`Tasks.create`), or InvalidRequest
        for a DP task whose selection window cannot see its population at the check-in
        pace (:func:`~coordinator.rounds.launch.check_pace`). The three steps of
        :meth:`launch_task`, :meth:`build_task` and :meth:`register_task` in one go."""
        return self.register_task(self.build_task(self.launch_task(spec)))

    def launch_task(self, spec: TaskSpec) -> TaskLaunch:
        """The first step of :meth:`create_task` (on the event loop); raises as it does."""
        paced = check_pace(spec, pace_per_s=self.settings.checkin_pace_per_s)
        launch = self._tasks.launch(spec, self._clock.now())
        if paced is None:
            return launch
        return dataclasses.replace(launch, lines=(*launch.lines, paced))

    def build_task(self, launch: TaskLaunch) -> BuiltTask:
        """The costly step of :meth:`create_task`: thread-safe, so that the event loop need
        not wait while a large model is built and written (:meth:`Tasks.build`)."""
        return self._tasks.build(launch)

    def register_task(self, built: BuiltTask) -> TaskView:
        """The last step of :meth:`create_task` (on the event loop)."""
        return self._tasks.register(built, self._clock.now())

    def get_task(self, task_id: str) -> TaskView:
        return self._tasks.view(task_id)

    def list_tasks(self) -> list[TaskView]:
        return self._tasks.all()

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        return self._tasks.rounds(task_id)

    def cancel_task(self, task_id: str, reason: str = "") -> TaskView:
        return self._tasks.cancel(task_id, self._clock.now(), reason)

    def model_version(self, task_id: str, version: int | None) -> ModelVersionRecord:
        """The record of ``version`` (None: the latest committed one)."""
        self._tasks.record(task_id)
        return self._models.version(task_id, version)

    def model_chunks(self, record: ModelVersionRecord, chunk_bytes: int) -> Iterator[bytes]:
        return self._models.chunks(record, chunk_bytes)

    # ------------------------------------------------------------------ devices

    def check_in(self, device_id: str, attrs: DeviceAttributes, task_id: str | None = None,
                 *, schema: DataSchema | None = None,
                 declined: frozenset[str] = frozenset(),
                 stratum: str | None = None) -> CheckInResult:
        """``schema``: the device's data, remembered for launch checks; ``declined``: tasks
        the device declined, never offered to it again; ``stratum``: the device's declared
        stratum (experiments with per-stratum splits), kept with its seat, never in events."""
        result = self._participants.check_in(device_id, attrs, task_id, schema=schema,
                                             declined=declined, stratum=stratum)
        if result.task_id:
            # One event per check-in, its kind the answer (a check-in is the hottest path:
            # every event costs each sink, Kafka's included).
            if result.outcome is CheckInOutcome.RETRY_LATER:
                self.events.emit(EventKind.DEVICE_TOLD_TO_COME_BACK, result.task_id,
                                 self._clock.now(), round_number=result.round_number,
                                 device_id=device_id, reason=result.outcome.value,
                                 detail=result.message,
                                 values={"retry_after_s": result.retry_after_s})
            else:
                self.events.emit(EventKind.DEVICE_CHECKED_IN, result.task_id,
                                 self._clock.now(), device_id=device_id,
                                 reason=result.outcome.value)
        return result

    def get_plan(self, p: Participation) -> Plan:
        return self._participants.plan(p)

    def model_for_participant(self, p: Participation, version: int) -> ModelVersionRecord:
        return self._participants.model(p, version)

    def begin_upload(self, header: UpdateHeader) -> Upload:
        """Checks an update's header; the caller then streams chunks into the returned Upload
        (unless ``upload.takes_data`` is False: a retried upload that was already answered),
        calls ``upload.verify()`` (off the event loop if it likes) once the stream ended
        successfully, then :meth:`finish_upload`; :meth:`abort_upload` in every case."""
        with self._refusals(header.participation):
            return self._participants.begin_upload(header)

    def abort_upload(self, upload: Upload) -> None:
        """Drops an upload's data and its place in the round; idempotent."""
        self._participants.abort_upload(upload)

    def finish_upload(self, upload: Upload) -> str:
        """Counts the verified update into the round's aggregate (or answers a retried one as
        the first time); returns the answer for the device."""
        try:
            return self._participants.finish_upload(upload)
        except CoordinatorError as exc:
            self._refused(upload.header.participation, exc)
            raise

    def largest_masked_input_bytes(self) -> int:
        """An upper bound on the masked input (ring elements x their bytes) of any running
        secure-aggregation task; 0 when none runs. Transports bound a message by it before
        parsing."""
        return self._participants.largest_masked_input_bytes()

    def most_secagg_neighbours(self) -> int:
        """The most neighbours a device has in any running secure-aggregation task; 0 when
        none runs. Transports bound the SecAgg key-sharing and unmasking messages by it."""
        return self._participants.most_secagg_neighbours()

    def report_status(self, p: Participation, metrics: Mapping[str, float], error: str,
                      *, decline: bool = False) -> None:
        """A device's evaluation metrics, or the error that kept it out of the round;
        ``decline``: it cannot run the task at all (counted by reason; see
        :mod:`coordinator.rounds.declines`)."""
        self._participants.report_status(p, metrics, error, decline=decline)

    def secagg_advertise(self, p: Participation, message: KeyAdvertisement) -> None:
        with self._refusals(p):
            self._participants.secagg_advertise(p, message)

    def secagg_share_keys(self, p: Participation, message: ShareKeysResponse) -> None:
        with self._refusals(p):
            self._participants.secagg_share_keys(p, message)

    def secagg_masked_input(self, p: Participation, vector: RingVector,
                            metrics: Mapping[str, float], clipped: int) -> None:
        with self._refusals(p):
            self._participants.secagg_masked_input(p, vector, metrics, clipped)

    def secagg_unmask(self, p: Participation, message: UnmaskResponse) -> None:
        with self._refusals(p):
            self._participants.secagg_unmask(p, message)

    @contextlib.contextmanager
    def _refusals(self, p: Participation) -> Iterator[None]:
        """Emits the refusal a device's message got (the error still reaches the caller)."""
        try:
            yield
        except CoordinatorError as exc:
            self._refused(p, exc)
            raise

    def _refused(self, p: Participation, error: CoordinatorError) -> None:
        reason = rejection_reason(error)
        kind = EventKind.DEVICE_LATE if reason == "late" else EventKind.UPLOAD_REJECTED
        self.events.emit(kind, p.task_id, self._clock.now(), round_number=p.round_number,
                         device_id=p.device_id, reason=reason, detail=str(error))

    def secagg_reply(self, p: Participation, after: Stage) -> object | None:
        """The device's message for the stage after ``after`` once ``after`` closed; None
        while it is open. Raises Late once the device or the round is out of the protocol."""
        return self._participants.secagg_reply(p, after)

    def secagg_plan(self, p: Participation) -> SecAggPlan:
        return self._participants.secagg_plan(p)


__all__ = [
    "CheckInOutcome",
    "CheckInResult",
    "CoordinatorService",
    "KeyAdvertisement",
    "MaskedInputRequest",
    "Participation",
    "Plan",
    "ShareKeysRequest",
    "ShareKeysResponse",
    "Stage",
    "TaskView",
    "UnmaskRequest",
    "UnmaskResponse",
    "Upload",
    "UpdateHeader",
]
