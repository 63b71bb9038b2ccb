"""DeferredParticipantWrites: a :class:`Store` that groups the participant writes of many
devices into one transaction (group commit).

Every admission and every report is a participant write; one transaction each costs a
commit (and under ``synchronous=FULL``, an fsync) per device on the event loop. Deferred,
they are checked at once against what this store knows of the round, queued, and written
together by :meth:`DeferredParticipantWrites.flush`: the transport awaits
:meth:`DeferredParticipantWrites.flushed_through` before it answers a device, so an answer
never goes out before its write is in the database (a device is still told of its seat only
once the seat is recorded), while the writes of every device answered in the same moment
share one commit.

Ordering: every other call flushes the queue first, so a read sees every write made before
it, and a round's state changes (``AGGREGATING``, ``commit_round``) are written after the
reports of that round. A crash loses only queued writes, whose devices have not been
answered yet; the open round they belong to is failed and redone at the restart as before.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence

from coordinator.storage.base import Store
from coordinator.storage.errors import Conflict, NotFound, StorageError
from coordinator.storage.records import (
    ModelVersionRecord,
    NewParticipants,
    ParticipantRecord,
    ParticipantUpdate,
    ParticipantWrite,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState


class DeferredParticipantWrites(Store):
    """Wraps ``inner``. Until :meth:`defer` is called it passes every call straight through;
    afterwards :meth:`add_participants` and :meth:`set_participant_state` of rounds that are
    not final are checked against this store's copy of the round's participants (loaded
    once per round), raise what the inner store would (NotFound, Conflict) and are queued.

    Thread-safe: queueing takes a short lock; :meth:`flush` and every other call hold an
    I/O lock while they use ``inner``, so queued writes keep their order with all others.
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self._deferring = False
        self._lock = threading.Lock()  # the queue, the copies and the sequence numbers
        self._io = threading.RLock()  # calls into the inner store, in order
        self._pending: list[ParticipantWrite] = []
        #: Participants of the open rounds this store has written or loaded.
        self._rounds: dict[int, dict[str, ParticipantRecord]] = {}
        self._queued_seq = 0
        self._written_seq = 0
        self._stale_seq = 0
        #: Sequence ranges (first, last) of batches the database refused and that were
        #: dropped, with the reason: their callers must hear of it, not of a later success.
        self._lost: list[tuple[int, int, str]] = []

    def defer(self) -> None:
        """Queue participant writes from now on; whoever answers a device must then await
        :meth:`flushed_through` (the transport does) or call :meth:`flush`."""
        self._deferring = True

    @property
    def queued_seq(self) -> int:
        """Sequence number of the last write queued."""
        return self._queued_seq

    @property
    def written_seq(self) -> int:
        """Sequence number of the last write known to be in the inner store."""
        return self._written_seq

    def flushed_through(self, seq: int) -> bool:
        """True once the write numbered ``seq`` (and every one before it) was flushed.

        Raises:
            StorageError: that write was in a batch the database refused, whichever thread
                flushed it (it will never be written: the caller must not answer as if it
                had been).
        """
        with self._lock:
            for first, last, reason in self._lost:
                if first <= seq <= last:
                    raise StorageError(f"the write was refused and dropped: {reason}")
        return self._written_seq >= seq

    def flush_stale(self) -> None:
        """Flushes the writes that were queued already at the previous call and are still
        not written (nobody awaited them: e.g. seats the round machine expired), so that a
        periodic caller bounds how long any write stays queued without adding a commit to
        the writes a transport is about to flush. Returns at once while another thread
        flushes."""
        stale, self._stale_seq = self._stale_seq, self._queued_seq
        if self._written_seq >= stale:
            return
        # A flush under way (off the caller's thread) is left to finish: the stale writes
        # go with the next call or the next flush, and the caller (the event loop) never
        # waits for the disk here.
        if not self._io.acquire(blocking=False):
            self._stale_seq = stale
            return
        try:
            self.flush()
        finally:
            self._io.release()

    def flush(self) -> None:
        """Writes the queued writes with one :meth:`Store.write_participants` call.

        On a StorageError of the database itself they stay queued (the next flush tries
        again) and it is raised. If the database refuses the batch (Conflict or NotFound:
        a write that raced its round's end, say), each write is tried again on its own, so
        one device's refused write costs only that device: the refused ones are dropped
        with the copies of their rounds (loaded again from the database when next needed)
        and :meth:`flushed_through` raises for them, whoever flushed."""
        with self._io:
            with self._lock:
                batch, self._pending = self._pending, []
                seq = self._queued_seq
            if not batch:
                return
            first = seq - len(batch) + 1
            try:
                self.inner.write_participants(batch)
            except (Conflict, NotFound):
                self._write_one_by_one(batch, first)
            except StorageError:
                with self._lock:
                    self._pending[:0] = batch
                raise
            except BaseException as exc:
                with self._lock:
                    self._drop(batch, first, seq, exc)
                raise
            self._written_seq = max(self._written_seq, seq)

    def _write_one_by_one(self, batch: list[ParticipantWrite], first: int) -> None:
        """The writes of a refused batch, each in its own transaction (under the I/O lock);
        a refused one is dropped, the others are written."""
        for offset, write in enumerate(batch):
            try:
                self.inner.write_participants([write])
            except (Conflict, NotFound) as exc:
                with self._lock:
                    self._drop([write], first + offset, first + offset, exc)

    # -- participants ------------------------------------------------------------------

    def add_participants(
        self, round_id: int, participants: Sequence[tuple[str, str]], now: float
    ) -> None:
        known = self._known(round_id)
        if known is None:
            with self._io:
                self.flush()
                self.inner.add_participants(round_id, participants, now)
            return
        with self._lock:
            seen: set[str] = set()
            for device_id, _ in participants:
                if device_id in seen or device_id in known:
                    raise Conflict(
                        f"device {device_id!r} is already a participant of round {round_id}")
                seen.add(device_id)
            for device_id, token_hash in participants:
                known[device_id] = ParticipantRecord(
                    round_id=round_id, device_id=device_id, token_hash=token_hash,
                    state=ParticipantState.SELECTED, num_examples=0, metrics={},
                    updated_at=now)
            self._queue(NewParticipants(round_id, tuple(participants), now))

    def set_participant_state(
        self,
        round_id: int,
        device_id: str,
        state: ParticipantState,
        *,
        now: float,
        num_examples: int = 0,
        metrics: Mapping[str, float] | None = None,
    ) -> ParticipantRecord:
        known = self._known(round_id)
        if known is None:
            with self._io:
                self.flush()
                return self.inner.set_participant_state(
                    round_id, device_id, state, now=now, num_examples=num_examples,
                    metrics=metrics)
        with self._lock:
            old = known.get(device_id)
            if old is None:
                raise NotFound(f"device {device_id!r} is not a participant of round {round_id}")
            if old.state is ParticipantState.REPORTED and state is ParticipantState.REPORTED:
                raise Conflict(f"device {device_id!r} already reported in round {round_id}")
            new = dataclasses.replace(
                old, state=state, num_examples=num_examples or old.num_examples,
                metrics=old.metrics if metrics is None else metrics, updated_at=now)
            known[device_id] = new
            self._queue(ParticipantUpdate(round_id, device_id, state, now, num_examples,
                                          None if metrics is None else dict(metrics)))
            return new

    def write_participants(self, writes: Sequence[ParticipantWrite]) -> None:
        with self._io:
            self.flush()
            self.inner.write_participants(writes)
            with self._lock:
                for write in writes:
                    self._rounds.pop(write.round_id, None)

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        with self._io:
            self.flush()
            return self.inner.get_participant(round_id, device_id)

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        with self._io:
            self.flush()
            return self.inner.list_participants(round_id)

    def _drop(self, batch: list[ParticipantWrite], first: int, last: int,
              exc: BaseException) -> None:
        """Forgets a refused batch (under the lock): the copies of its rounds are loaded
        again when next needed, and its sequence numbers are remembered as lost (the last
        few hundred batches: a waiting caller asks within moments)."""
        for write in batch:
            self._rounds.pop(write.round_id, None)
        self._lost.append((first, last, f"{type(exc).__name__}: {exc}"))
        del self._lost[:-256]

    def _queue(self, write: ParticipantWrite) -> None:
        self._pending.append(write)
        self._queued_seq += 1

    def _known(self, round_id: int) -> dict[str, ParticipantRecord] | None:
        """This store's copy of an open round's participants (loaded on first use); None
        when writes are not deferred or the round is final (then the inner store decides)."""
        if not self._deferring:
            return None
        with self._lock:
            known = self._rounds.get(round_id)
        if known is not None:
            return known
        with self._io:
            self.flush()
            rnd = self.inner.get_round(round_id)
            if rnd.state.is_final:
                return None
            loaded = {p.device_id: p for p in self.inner.list_participants(round_id)}
        with self._lock:
            return self._rounds.setdefault(round_id, loaded)

    def _forget(self, round_id: int) -> None:
        with self._lock:
            self._rounds.pop(round_id, None)

    # -- everything else: flush, then the inner store ------------------------------------

    def create_task(
        self, task_id: str, spec_json: str, initial_version: ModelVersionRecord, now: float
    ) -> TaskRecord:
        with self._io:
            self.flush()
            return self.inner.create_task(task_id, spec_json, initial_version, now)

    def get_task(self, task_id: str) -> TaskRecord:
        with self._io:
            self.flush()
            return self.inner.get_task(task_id)

    def list_tasks(self) -> list[TaskRecord]:
        with self._io:
            self.flush()
            return self.inner.list_tasks()

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        with self._io:
            self.flush()
            return self.inner.set_task_state(task_id, state, reason)

    def open_round(
        self, task_id: str, round_number: int, goal: int, started_at: float, deadline: float
    ) -> RoundRecord:
        with self._io:
            self.flush()
            rec = self.inner.open_round(task_id, round_number, goal, started_at, deadline)
            if self._deferring:
                with self._lock:
                    self._rounds[rec.round_id] = {}
            return rec

    def get_round(self, round_id: int) -> RoundRecord:
        with self._io:
            self.flush()
            return self.inner.get_round(round_id)

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        with self._io:
            self.flush()
            return self.inner.list_rounds(task_id)

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        with self._io:
            self.flush()
            return self.inner.open_round_of(task_id)

    def set_round_state(
        self,
        round_id: int,
        state: RoundState,
        *,
        now: float,
        failure_reason: str = "",
        deadline: float | None = None,
    ) -> RoundRecord:
        with self._io:
            self.flush()
            rec = self.inner.set_round_state(round_id, state, now=now,
                                             failure_reason=failure_reason, deadline=deadline)
            if rec.state.is_final:
                self._forget(round_id)
            return rec

    def commit_round(
        self, round_id: int, version: ModelVersionRecord, metrics: Mapping[str, float], now: float
    ) -> RoundRecord:
        with self._io:
            self.flush()
            rec = self.inner.commit_round(round_id, version, metrics, now)
            self._forget(round_id)
            return rec

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        with self._io:
            self.flush()
            return self.inner.update_round_metrics(round_id, metrics)

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        with self._io:
            self.flush()
            return self.inner.get_model_version(task_id, version)

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        with self._io:
            self.flush()
            return self.inner.latest_model_version(task_id)

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        with self._io:
            self.flush()
            return self.inner.list_model_versions(task_id)

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        with self._io:
            self.flush()
            failed = self.inner.fail_open_rounds(reason, now)
            with self._lock:
                self._rounds.clear()
            return failed

    def close(self) -> None:
        with self._io:
            self.flush()
            self.inner.close()
