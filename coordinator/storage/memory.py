"""Dict-based reference Store for fast unit tests; same semantics as the SQL one."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence

from coordinator.storage.base import Store, check_transition
from coordinator.storage.errors import Conflict, NotFound
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState


class InMemoryStore(Store):
    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._rounds: dict[int, RoundRecord] = {}
        self._versions: dict[tuple[str, int], ModelVersionRecord] = {}
        self._participants: dict[tuple[int, str], ParticipantRecord] = {}

    def create_task(self, task_id: str, spec_json: str, initial_version: ModelVersionRecord,
                    now: float) -> TaskRecord:
        if task_id in self._tasks:
            raise Conflict(f"task {task_id} already exists")
        rec = TaskRecord(task_id, spec_json, TaskState.RUNNING, now, 0,
                         initial_version.version, "")
        self._tasks[task_id] = rec
        self._versions[(task_id, initial_version.version)] = initial_version
        return rec

    def get_task(self, task_id: str) -> TaskRecord:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise NotFound(f"no task {task_id!r}") from None

    def list_tasks(self) -> list[TaskRecord]:
        return sorted(self._tasks.values(), key=lambda t: (t.created_at, t.task_id))

    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        rec = dataclasses.replace(self.get_task(task_id), state=state, reason=reason)
        self._tasks[task_id] = rec
        return rec

    def open_round(self, task_id: str, round_number: int, goal: int, started_at: float,
                   deadline: float) -> RoundRecord:
        self.get_task(task_id)
        rounds = [r for r in self._rounds.values() if r.task_id == task_id]
        if any(not r.state.is_final for r in rounds):
            raise Conflict(f"task {task_id} already has an open round")
        same = [r for r in rounds if r.round_number == round_number]
        if any(r.state is RoundState.COMMITTED for r in same):
            raise Conflict(f"round {round_number} of task {task_id} is already committed")
        round_id = max(self._rounds, default=0) + 1
        rec = RoundRecord(round_id, task_id, round_number, len(same) + 1, RoundState.SELECTING,
                          goal, started_at, deadline, None, 0, 0, "", None, {})
        self._rounds[round_id] = rec
        return rec

    def get_round(self, round_id: int) -> RoundRecord:
        try:
            return self._rounds[round_id]
        except KeyError:
            raise NotFound(f"no round {round_id}") from None

    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        self.get_task(task_id)
        return sorted((r for r in self._rounds.values() if r.task_id == task_id),
                      key=lambda r: (r.round_number, r.attempt))

    def open_round_of(self, task_id: str) -> RoundRecord | None:
        return next((r for r in self.list_rounds(task_id) if not r.state.is_final), None)

    def set_round_state(self, round_id: int, state: RoundState, *, now: float,
                        failure_reason: str = "", deadline: float | None = None) -> RoundRecord:
        rec = self.get_round(round_id)
        check_transition(rec.state, state)
        rec = dataclasses.replace(
            rec, state=state, failure_reason=failure_reason or rec.failure_reason,
            deadline=rec.deadline if deadline is None else deadline,
            ended_at=now if state.is_final else rec.ended_at)
        self._rounds[round_id] = rec
        return rec

    def add_participants(self, round_id: int, participants: Sequence[tuple[str, str]],
                         now: float) -> None:
        rec = self.get_round(round_id)
        devices = [d for d, _ in participants]
        if len(set(devices)) != len(devices) or any(
                (round_id, d) in self._participants for d in devices):
            raise Conflict(f"a device is already a participant of round {round_id}")
        for d, token_hash in participants:
            self._participants[(round_id, d)] = ParticipantRecord(
                round_id, d, token_hash, ParticipantState.SELECTED, 0, {}, now)
        self._rounds[round_id] = dataclasses.replace(rec, selected=rec.selected + len(devices))

    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        try:
            return self._participants[(round_id, device_id)]
        except KeyError:
            raise NotFound(f"device {device_id!r} is not a participant of round {round_id}"
                           ) from None

    def set_participant_state(self, round_id: int, device_id: str, state: ParticipantState, *,
                              now: float, num_examples: int = 0,
                              metrics: Mapping[str, float] | None = None) -> ParticipantRecord:
        p = self.get_participant(round_id, device_id)
        if p.state is ParticipantState.REPORTED and state is ParticipantState.REPORTED:
            raise Conflict(f"device {device_id!r} already reported in round {round_id}")
        p = dataclasses.replace(p, state=state, num_examples=num_examples or p.num_examples,
                                metrics=dict(metrics or p.metrics), updated_at=now)
        self._participants[(round_id, device_id)] = p
        if state is ParticipantState.REPORTED:
            r = self.get_round(round_id)
            self._rounds[round_id] = dataclasses.replace(r, reports=r.reports + 1)
        return p

    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        return sorted((p for (rid, _), p in self._participants.items() if rid == round_id),
                      key=lambda p: p.device_id)

    def commit_round(self, round_id: int, version: ModelVersionRecord,
                     metrics: Mapping[str, float], now: float) -> RoundRecord:
        rec = self.get_round(round_id)
        if rec.state is not RoundState.AGGREGATING:
            raise Conflict(f"round {round_id} is {rec.state.value}, not aggregating")
        if (rec.task_id, version.version) in self._versions:
            raise Conflict(f"model version {version.version} of {rec.task_id} already exists")
        if any(r.state is RoundState.COMMITTED and r.round_number == rec.round_number
               for r in self.list_rounds(rec.task_id)):
            raise Conflict(f"round {rec.round_number} of {rec.task_id} is already committed")
        self._versions[(rec.task_id, version.version)] = version
        rec = dataclasses.replace(rec, state=RoundState.COMMITTED, ended_at=now,
                                  model_version=version.version, metrics=dict(metrics))
        self._rounds[round_id] = rec
        task = self.get_task(rec.task_id)
        self._tasks[rec.task_id] = dataclasses.replace(
            task, model_version=version.version, rounds_committed=task.rounds_committed + 1)
        return rec

    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        rec = self.get_round(round_id)
        rec = dataclasses.replace(rec, metrics={**rec.metrics, **metrics})
        self._rounds[round_id] = rec
        return rec

    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        try:
            return self._versions[(task_id, version)]
        except KeyError:
            raise NotFound(f"task {task_id!r} has no model version {version}") from None

    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        versions = self.list_model_versions(task_id)
        if not versions:
            raise NotFound(f"task {task_id!r} has no model version")
        return versions[-1]

    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        return sorted((v for (t, _), v in self._versions.items() if t == task_id),
                      key=lambda v: v.version)

    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        failed = []
        for rid, r in list(self._rounds.items()):
            if not r.state.is_final:
                failed.append(self.set_round_state(rid, RoundState.FAILED, now=now,
                                                   failure_reason=reason))
        return failed

    def close(self) -> None:
        pass

    def snapshot(self) -> InMemoryStore:
        """A deep copy (tests use it to compare state before and after a failed call)."""
        return copy.deepcopy(self)
