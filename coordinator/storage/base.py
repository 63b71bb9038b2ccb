"""The coordinator's persistence interface. One contract test suite runs against every
implementation (tests/contract/test_store_contract.py).

Thread-safety: implementations are called from one thread at a time (the coordinator's event
loop). Every method is atomic: it either applies all its writes or none.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState


class Store(abc.ABC):
    @abc.abstractmethod
    def create_task(self, task_id: str, spec_json: str, initial_version: ModelVersionRecord,
                    now: float) -> TaskRecord:
        """Inserts a RUNNING task and its version-0 model row in one transaction."""

    @abc.abstractmethod
    def get_task(self, task_id: str) -> TaskRecord: ...

    @abc.abstractmethod
    def list_tasks(self) -> list[TaskRecord]:
        """All tasks, oldest first."""

    @abc.abstractmethod
    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord: ...

    @abc.abstractmethod
    def open_round(self, task_id: str, round_number: int, goal: int, started_at: float,
                   deadline: float) -> RoundRecord:
        """A new SELECTING attempt; Conflict if the number is committed or a round is open."""

    @abc.abstractmethod
    def get_round(self, round_id: int) -> RoundRecord: ...

    @abc.abstractmethod
    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        """Ordered by (round_number, attempt)."""

    @abc.abstractmethod
    def open_round_of(self, task_id: str) -> RoundRecord | None: ...

    @abc.abstractmethod
    def set_round_state(self, round_id: int, state: RoundState, *, now: float,
                        failure_reason: str = "", deadline: float | None = None) -> RoundRecord:
        """Applies an allowed transition (records.ROUND_TRANSITIONS); Conflict otherwise."""

    @abc.abstractmethod
    def add_participants(self, round_id: int, participants: Sequence[tuple[str, str]],
                         now: float) -> None:
        """(device_id, token_hash) pairs as SELECTED; Conflict on a duplicate device."""

    @abc.abstractmethod
    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord: ...

    @abc.abstractmethod
    def set_participant_state(self, round_id: int, device_id: str, state: ParticipantState, *,
                              now: float, num_examples: int = 0,
                              metrics: Mapping[str, float] | None = None) -> ParticipantRecord:
        """Moving to REPORTED also counts the report on the round, in the same transaction."""

    @abc.abstractmethod
    def list_participants(self, round_id: int) -> list[ParticipantRecord]: ...

    @abc.abstractmethod
    def commit_round(self, round_id: int, version: ModelVersionRecord,
                     metrics: Mapping[str, float], now: float) -> RoundRecord:
        """AGGREGATING -> COMMITTED with its new model version, in one transaction."""

    @abc.abstractmethod
    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord: ...

    @abc.abstractmethod
    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord: ...

    @abc.abstractmethod
    def latest_model_version(self, task_id: str) -> ModelVersionRecord: ...

    @abc.abstractmethod
    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]: ...

    @abc.abstractmethod
    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        """Marks every non-final round FAILED (start-up after a crash); returns them."""

    @abc.abstractmethod
    def close(self) -> None: ...


def check_transition(current: RoundState, new: RoundState) -> None:
    from coordinator.storage.errors import Conflict
    from coordinator.storage.records import ROUND_TRANSITIONS

    if new not in ROUND_TRANSITIONS[current]:
        raise Conflict(f"round cannot go from {current.value} to {new.value}")
