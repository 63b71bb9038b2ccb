"""A :class:`~coordinator.storage.Store` that emits an event for every transition it stores.

The round logic writes each transition to the store before anything depends on it, so the
store is the one place that sees all of them; wrapping it keeps the round code free of event
calls. An event is emitted only after its write returned (a refused or failed write emits
nothing). Reads pass through untouched.

=====================================  =====================================================
write                                  events
=====================================  =====================================================
``create_task``                        TASK_CREATED
``set_task_state``                     BUDGET_EXHAUSTED, or TASK_ENDED (reason: the state)
``open_round``                         ROUND_OPENED
``set_round_state`` (FAILED)           ROUND_FAILED (detail: the failure reason)
``fail_open_rounds``                   ROUND_FAILED for each (a restart)
``add_participants``                   DEVICE_SELECTED for each device
``set_participant_state`` REPORTED     UPLOAD_ACCEPTED
``set_participant_state`` ERRORED      DEVICE_DROPPED
``commit_round``                       MODEL_VERSION_CREATED, then ROUND_COMMITTED
=====================================  =====================================================

REJECTED participants are not emitted here: the service emits the refusal with its reason
(:meth:`coordinator.rounds.service.CoordinatorService.finish_upload`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from coordinator.observability.events import EventHub, EventKind
from coordinator.storage.base import Store
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState


class ObservedStore(Store):
    """Delegates to ``inner`` and emits into ``events``. Thread-safety: that of ``inner``
    (the hub is thread-safe)."""

    def __init__(self, inner: Store, events: EventHub, now: Callable[[], float]) -> None:
        """``now``: the coordinator's clock, for the task-state events (the store's task
        writes carry no time)."""
        self.inner = inner
        self.events = events
        self._now = now
        #: round_id -> (task_id, round_number), for the participant writes (which name only
        #: the round id); filled as rounds are opened or read.
        self._rounds: dict[int, tuple[str, int]] = {}

    def _round_of(self, round_id: int) -> tuple[str, int]:
        known = self._rounds.get(round_id)
        if known is None:
            rec = self.inner.get_round(round_id)
            known = self._rounds[round_id] = (rec.task_id, rec.round_number)
        return known

    # -- tasks -------------------------------------------------------------------------

    def create_task(self, task_id: str, spec_json: str, initial_version: ModelVersionRecord,
                    now: float) -> TaskRecord:
        rec = self.inner.create_task(task_id, spec_json, initial_version, now)
        self.events.emit(EventKind.TASK_CREATED, task_id, now)
        return rec

    def get_task(self, task_id: str) -> TaskRecord:
        return self.inner.get_task(task_id)

    def list_tasks(self) -> list[TaskRecord]:
        return self.inner.list_tasks()

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        rec = self.inner.set_task_state(task_id, state, reason)
        if state.is_final:
            kind = (EventKind.BUDGET_EXHAUSTED if state is TaskState.BUDGET_EXHAUSTED
                    else EventKind.TASK_ENDED)
            self.events.emit(kind, task_id, self._now(), reason=state.value,
                             detail=reason,
                             values={"rounds_committed": float(rec.rounds_committed)})
        return rec

    # -- rounds ------------------------------------------------------------------------

    def open_round(self, task_id: str, round_number: int, goal: int, started_at: float,
                   deadline: float) -> RoundRecord:
        rec = self.inner.open_round(task_id, round_number, goal, started_at, deadline)
        self._rounds[rec.round_id] = (task_id, round_number)
        self.events.emit(EventKind.ROUND_OPENED, task_id, started_at, round_number=round_number,
                         values={"attempt": float(rec.attempt), "goal": float(goal)})
        return rec

    def get_round(self, round_id: int) -> RoundRecord:
        return self.inner.get_round(round_id)

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        return self.inner.list_rounds(task_id)

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        return self.inner.open_round_of(task_id)

    def set_round_state(self, round_id: int, state: RoundState, *, now: float,
                        failure_reason: str = "", deadline: float | None = None) -> RoundRecord:
        rec = self.inner.set_round_state(round_id, state, now=now,
                                         failure_reason=failure_reason, deadline=deadline)
        if state is RoundState.FAILED:
            self._round_failed(rec, now)
        return rec

    def _round_failed(self, rec: RoundRecord, now: float) -> None:
        self.events.emit(EventKind.ROUND_FAILED, rec.task_id, now,
                         round_number=rec.round_number, detail=rec.failure_reason,
                         values={"attempt": float(rec.attempt), "selected": float(rec.selected),
                                 "reports": float(rec.reports),
                                 "seconds": now - rec.started_at})

    # -- participants ------------------------------------------------------------------

    def add_participants(self, round_id: int, participants: Sequence[tuple[str, str]],
                         now: float) -> None:
        self.inner.add_participants(round_id, participants, now)
        task_id, number = self._round_of(round_id)
        for device_id, _ in participants:
            self.events.emit(EventKind.DEVICE_SELECTED, task_id, now, round_number=number,
                             device_id=device_id)

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        return self.inner.get_participant(round_id, device_id)

    def set_participant_state(self, round_id: int, device_id: str, state: ParticipantState, *,
                              now: float, num_examples: int = 0,
                              metrics: Mapping[str, float] | None = None) -> ParticipantRecord:
        rec = self.inner.set_participant_state(round_id, device_id, state, now=now,
                                               num_examples=num_examples, metrics=metrics)
        task_id, number = self._round_of(round_id)
        if state is ParticipantState.REPORTED:
            self.events.emit(EventKind.UPLOAD_ACCEPTED, task_id, now, round_number=number,
                             device_id=device_id)
        elif state is ParticipantState.ERRORED:
            self.events.emit(EventKind.DEVICE_DROPPED, task_id, now, round_number=number,
                             device_id=device_id)
        return rec

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        return self.inner.list_participants(round_id)

    # -- commits and model versions ----------------------------------------------------

    def commit_round(self, round_id: int, version: ModelVersionRecord,
                     metrics: Mapping[str, float], now: float) -> RoundRecord:
        rec = self.inner.commit_round(round_id, version, metrics, now)
        self.events.emit(EventKind.MODEL_VERSION_CREATED, rec.task_id, now,
                         round_number=rec.round_number,
                         values={"version": float(version.version),
                                 "size_bytes": float(version.size_bytes)})
        self.events.emit(EventKind.ROUND_COMMITTED, rec.task_id, now,
                         round_number=rec.round_number,
                         values={**metrics, "version": float(version.version),
                                 "selected": float(rec.selected),
                                 "seconds": now - rec.started_at})
        return rec

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        return self.inner.update_round_metrics(round_id, metrics)

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        return self.inner.get_model_version(task_id, version)

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        return self.inner.latest_model_version(task_id)

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        return self.inner.list_model_versions(task_id)

    # -- lifecycle ---------------------------------------------------------------------

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        failed = self.inner.fail_open_rounds(reason, now)
        for rec in failed:
            self._round_failed(rec, now)
        return failed

    def close(self) -> None:
        self.inner.close()
