"""What the store keeps, as frozen values. Times are Unix seconds."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from core.types import ParticipantState, RoundState, TaskState

#: Allowed round transitions; COMMITTED is reached only through ``Store.commit_round``.
ROUND_TRANSITIONS: dict[RoundState, frozenset[RoundState]] = {
    RoundState.SELECTING: frozenset({RoundState.TRAINING, RoundState.FAILED}),
    RoundState.TRAINING: frozenset({RoundState.AGGREGATING, RoundState.FAILED}),
    RoundState.AGGREGATING: frozenset({RoundState.FAILED}),
    RoundState.COMMITTED: frozenset(),
    RoundState.FAILED: frozenset(),
}


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    spec_json: str
    state: TaskState
    created_at: float
    rounds_committed: int
    model_version: int
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    round_id: int
    task_id: str
    round_number: int
    attempt: int
    state: RoundState
    goal: int
    started_at: float
    deadline: float
    ended_at: float | None
    selected: int
    reports: int
    failure_reason: str
    model_version: int | None
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersionRecord:
    task_id: str
    version: int
    round_number: int
    path: str
    sha256: str
    size_bytes: int
    optimizer_state_path: str | None
    created_at: float


@dataclass(frozen=True)
class ParticipantRecord:
    round_id: int
    device_id: str
    token_hash: str
    state: ParticipantState
    num_examples: int
    metrics: Mapping[str, float]
    updated_at: float
