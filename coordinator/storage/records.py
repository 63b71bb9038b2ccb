"""What the store keeps, as frozen values. Times are Unix seconds (float).

Metrics mappings are copied into read-only mappings when a record is built, so a record can
be shared freely: neither its holder nor the store can change it afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from core.types import ParticipantState, RoundState, TaskState


def _frozen(metrics: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(metrics))


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    #: The TaskSpec as JSON text; the store never parses it (see core.taskspec).
    spec_json: str
    state: TaskState
    created_at: float
    rounds_committed: int
    #: Version of the task's current model: 0 at creation, then that of the last commit.
    model_version: int
    #: Why the task reached its state (failed, cancelled); empty otherwise.
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    """One attempt of one round. A failed round is redone as attempt + 1 of its number."""

    #: Unique over all tasks; assigned by the store.
    round_id: int
    task_id: str
    round_number: int
    attempt: int
    state: RoundState
    #: Reports the round needs to complete.
    goal: int
    started_at: float
    deadline: float
    #: Set when the round reaches a final state (COMMITTED or FAILED).
    ended_at: float | None
    #: Participants admitted so far.
    selected: int
    #: Participants whose update was accepted.
    reports: int
    failure_reason: str
    #: The model version the round committed; None until it does.
    model_version: int | None
    metrics: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen(self.metrics))


@dataclass(frozen=True)
class ModelVersionRecord:
    task_id: str
    version: int
    #: The round that produced it; 0 for the initial model.
    round_number: int
    #: Relative to the blob store root (FileBlobStore).
    path: str
    sha256: str
    size_bytes: int
    optimizer_state_path: str | None
    created_at: float


@dataclass(frozen=True)
class ParticipantRecord:
    round_id: int
    device_id: str
    #: Hash of the participation token the device was given; the token itself is never stored.
    token_hash: str
    state: ParticipantState
    num_examples: int
    metrics: Mapping[str, float]
    updated_at: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen(self.metrics))


@dataclass(frozen=True)
class NewParticipants:
    """A write of :meth:`Store.write_participants <coordinator.storage.base.Store.
    write_participants>`: what :meth:`~coordinator.storage.base.Store.add_participants`
    takes."""

    round_id: int
    #: (device id, token hash) pairs.
    participants: tuple[tuple[str, str], ...]
    now: float


@dataclass(frozen=True)
class ParticipantUpdate:
    """A write of :meth:`Store.write_participants <coordinator.storage.base.Store.
    write_participants>`: what :meth:`~coordinator.storage.base.Store.set_participant_state`
    takes (``num_examples`` 0 and ``metrics`` None keep the stored ones)."""

    round_id: int
    device_id: str
    state: ParticipantState
    now: float
    num_examples: int = 0
    metrics: Mapping[str, float] | None = None


#: One write of a batch of participant writes.
ParticipantWrite = NewParticipants | ParticipantUpdate


@dataclass(frozen=True)
class EventRecord:
    """One stored event (:class:`coordinator.observability.events.Event`, its kind by its
    value: the store knows no kinds). ``(task_id, seq)`` is its key."""

    task_id: str
    seq: int
    kind: str
    at: float
    round_number: int
    device_id: str
    reason: str
    detail: str
    values: Mapping[str, float]
    #: The event record's layout version (``EVENT_SCHEMA_VERSION`` when it was written).
    schema: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _frozen(self.values))
