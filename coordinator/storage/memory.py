"""InMemoryStore: the reference :class:`Store` over dicts, for fast tests of the round logic.

Same semantics as the SQL store (the contract suite checks both). Atomicity comes from
checking everything a method could refuse before its first write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from coordinator.storage.base import (
    Store,
    check_round_transition,
    check_version_of,
    metrics_dict,
)
from coordinator.storage.errors import Conflict, NotFound
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    ParticipantWrite,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState


class InMemoryStore(Store):
    """Everything in dicts; lost when the process ends. Not thread-safe."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._rounds: dict[int, RoundRecord] = {}
        self._versions: dict[tuple[str, int], ModelVersionRecord] = {}
        self._participants: dict[tuple[int, str], ParticipantRecord] = {}
        self._next_round_id = 1

    # -- tasks -------------------------------------------------------------------------

    def create_task(
        self, task_id: str, spec_json: str, initial_version: ModelVersionRecord, now: float
    ) -> TaskRecord:
        check_version_of(initial_version, task_id)
        if task_id in self._tasks:
            raise Conflict(f"task {task_id!r} already exists")
        task = TaskRecord(
            task_id=task_id, spec_json=spec_json, state=TaskState.RUNNING, created_at=now,
            rounds_committed=0, model_version=initial_version.version, reason="",
        )
        self._tasks[task_id] = task
        self._versions[(task_id, initial_version.version)] = initial_version
        return task

    def get_task(self, task_id: str) -> TaskRecord:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise NotFound(f"no task {task_id!r}") from None

    def list_tasks(self) -> list[TaskRecord]:
        return sorted(self._tasks.values(), key=lambda t: (t.created_at, t.task_id))

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        task = dataclasses.replace(self.get_task(task_id), state=state, reason=reason)
        self._tasks[task_id] = task
        return task

    # -- rounds ------------------------------------------------------------------------

    def open_round(
        self, task_id: str, round_number: int, goal: int, started_at: float, deadline: float
    ) -> RoundRecord:
        task = self.get_task(task_id)
        if task.state is not TaskState.RUNNING:
            raise Conflict(f"task {task_id!r} is {task.state.value}; no round can open")
        rounds = self.list_rounds(task_id)
        for r in rounds:
            if not r.state.is_final:
                raise Conflict(
                    f"task {task_id!r} already has round {r.round_number} open ({r.state.value})"
                )
        same = [r for r in rounds if r.round_number == round_number]
        if any(r.state is RoundState.COMMITTED for r in same):
            raise Conflict(f"round {round_number} of task {task_id!r} is already committed")
        rnd = RoundRecord(
            round_id=self._next_round_id, task_id=task_id, round_number=round_number,
            attempt=len(same) + 1, state=RoundState.SELECTING, goal=goal,
            started_at=started_at, deadline=deadline, ended_at=None, selected=0, reports=0,
            failure_reason="", model_version=None, metrics={},
        )
        self._rounds[rnd.round_id] = rnd
        self._next_round_id += 1
        return rnd

    def get_round(self, round_id: int) -> RoundRecord:
        try:
            return self._rounds[round_id]
        except KeyError:
            raise NotFound(f"no round {round_id}") from None

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        self.get_task(task_id)
        return sorted(
            (r for r in self._rounds.values() if r.task_id == task_id),
            key=lambda r: (r.round_number, r.attempt),
        )

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        return next((r for r in self.list_rounds(task_id) if not r.state.is_final), None)

    def set_round_state(
        self,
        round_id: int,
        state: RoundState,
        *,
        now: float,
        failure_reason: str = "",
        deadline: float | None = None,
    ) -> RoundRecord:
        rnd = self.get_round(round_id)
        check_round_transition(rnd.state, state)
        rnd = dataclasses.replace(
            rnd,
            state=state,
            failure_reason=failure_reason or rnd.failure_reason,
            deadline=rnd.deadline if deadline is None else deadline,
            ended_at=now if state.is_final else rnd.ended_at,
        )
        self._rounds[round_id] = rnd
        return rnd

    # -- participants ------------------------------------------------------------------

    def add_participants(
        self, round_id: int, participants: Sequence[tuple[str, str]], now: float
    ) -> None:
        rnd = self.get_round(round_id)
        if rnd.state.is_final:
            raise Conflict(f"round {round_id} is {rnd.state.value}; no one can join it")
        seen: set[str] = set()
        for device_id, _ in participants:
            if device_id in seen or (round_id, device_id) in self._participants:
                raise Conflict(f"device {device_id!r} is already a participant of round {round_id}")
            seen.add(device_id)
        for device_id, token_hash in participants:
            self._participants[(round_id, device_id)] = ParticipantRecord(
                round_id=round_id, device_id=device_id, token_hash=token_hash,
                state=ParticipantState.SELECTED, num_examples=0, metrics={}, updated_at=now,
            )
        self._rounds[round_id] = dataclasses.replace(rnd, selected=rnd.selected + len(seen))

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        try:
            return self._participants[(round_id, device_id)]
        except KeyError:
            raise NotFound(
                f"device {device_id!r} is not a participant of round {round_id}"
            ) from None

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
        old = self.get_participant(round_id, device_id)
        was_reported = old.state is ParticipantState.REPORTED
        is_reported = state is ParticipantState.REPORTED
        if was_reported and is_reported:
            raise Conflict(f"device {device_id!r} already reported in round {round_id}")
        new = dataclasses.replace(
            old,
            state=state,
            num_examples=num_examples or old.num_examples,
            metrics=old.metrics if metrics is None else metrics_dict(metrics),
            updated_at=now,
        )
        self._participants[(round_id, device_id)] = new
        if was_reported != is_reported:
            rnd = self.get_round(round_id)
            self._rounds[round_id] = dataclasses.replace(
                rnd, reports=rnd.reports + (1 if is_reported else -1)
            )
        return new

    def write_participants(self, writes: Sequence[ParticipantWrite]) -> None:
        """All or nothing: the rounds and participants as they were are put back when a
        write raises."""
        rounds, participants = dict(self._rounds), dict(self._participants)
        try:
            super().write_participants(writes)
        except BaseException:
            self._rounds, self._participants = rounds, participants
            raise

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        self.get_round(round_id)
        return sorted(
            (p for (rid, _), p in self._participants.items() if rid == round_id),
            key=lambda p: p.device_id,
        )

    # -- commits and model versions ----------------------------------------------------

    def commit_round(
        self, round_id: int, version: ModelVersionRecord, metrics: Mapping[str, float], now: float
    ) -> RoundRecord:
        rnd = self.get_round(round_id)
        check_version_of(version, rnd.task_id, rnd.round_number)
        if rnd.state is not RoundState.AGGREGATING:
            raise Conflict(
                f"round {round_id} is {rnd.state.value}; only an aggregating round commits"
            )
        if any(
            r.state is RoundState.COMMITTED and r.round_number == rnd.round_number
            for r in self.list_rounds(rnd.task_id)
        ):
            raise Conflict(f"round {rnd.round_number} of task {rnd.task_id!r} is already committed")
        if (rnd.task_id, version.version) in self._versions:
            raise Conflict(f"task {rnd.task_id!r} already has model version {version.version}")
        values = metrics_dict(metrics)
        task = self.get_task(rnd.task_id)
        self._versions[(rnd.task_id, version.version)] = version
        rnd = dataclasses.replace(
            rnd, state=RoundState.COMMITTED, ended_at=now, model_version=version.version,
            metrics=values,
        )
        self._rounds[round_id] = rnd
        self._tasks[rnd.task_id] = dataclasses.replace(
            task, model_version=version.version, rounds_committed=task.rounds_committed + 1
        )
        return rnd

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        rnd = self.get_round(round_id)
        rnd = dataclasses.replace(rnd, metrics={**rnd.metrics, **metrics_dict(metrics)})
        self._rounds[round_id] = rnd
        return rnd

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        self.get_task(task_id)
        try:
            return self._versions[(task_id, version)]
        except KeyError:
            raise NotFound(f"task {task_id!r} has no model version {version}") from None

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        versions = self.list_model_versions(task_id)
        if not versions:  # only if create_task was bypassed
            raise NotFound(f"task {task_id!r} has no model version")
        return versions[-1]

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        self.get_task(task_id)
        return sorted(
            (v for (t, _), v in self._versions.items() if t == task_id), key=lambda v: v.version
        )

    # -- lifecycle ---------------------------------------------------------------------

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        open_ids = sorted(rid for rid, r in self._rounds.items() if not r.state.is_final)
        return [
            self.set_round_state(rid, RoundState.FAILED, now=now, failure_reason=reason)
            for rid in open_ids
        ]

    def close(self) -> None:
        pass

