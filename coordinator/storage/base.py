"""The coordinator's persistence interface, :class:`Store`, and the round transition rules
every implementation enforces. One contract test suite runs against every implementation
(tests/contract/test_store_contract.py).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from coordinator.storage.errors import Conflict
from coordinator.storage.records import (
    ModelVersionRecord,
    NewParticipants,
    ParticipantRecord,
    ParticipantWrite,
    RoundRecord,
    TaskRecord,
)
from core.types import ParticipantState, RoundState, TaskState

#: Transitions :meth:`Store.set_round_state` allows. COMMITTED is missing on purpose: a round
#: reaches it only through :meth:`Store.commit_round`, together with its model version.
ROUND_TRANSITIONS: Mapping[RoundState, frozenset[RoundState]] = MappingProxyType(
    {
        RoundState.SELECTING: frozenset({RoundState.TRAINING, RoundState.FAILED}),
        RoundState.TRAINING: frozenset({RoundState.AGGREGATING, RoundState.FAILED}),
        RoundState.AGGREGATING: frozenset({RoundState.FAILED}),
        RoundState.COMMITTED: frozenset(),
        RoundState.FAILED: frozenset(),
    }
)


def check_round_transition(current: RoundState, new: RoundState) -> None:
    """Raises Conflict, naming both states, unless ``current -> new`` is in ROUND_TRANSITIONS."""
    if new not in ROUND_TRANSITIONS[current]:
        hint = " (a round is committed only by commit_round)" if new is RoundState.COMMITTED else ""
        raise Conflict(f"a round cannot go from {current.value} to {new.value}{hint}")


def check_version_of(
    version: ModelVersionRecord, task_id: str, round_number: int | None = None
) -> None:
    """Raises ValueError unless ``version`` is of ``task_id`` (and of ``round_number``)."""
    if version.task_id != task_id:
        raise ValueError(f"model version record of task {version.task_id!r} given for {task_id!r}")
    if round_number is not None and version.round_number != round_number:
        raise ValueError(
            f"model version record of round {version.round_number} given for round {round_number}"
        )


def metrics_dict(metrics: Mapping[str, float]) -> dict[str, float]:
    """A plain copy with str keys and float values (so every store returns the same types)."""
    return {str(name): float(value) for name, value in metrics.items()}


class Store(abc.ABC):
    """Tasks, round attempts, their participants and the model versions, with the rules that
    keep them consistent (round transitions, one open round per task, one commit per round
    number).

    Every method is atomic: it applies all of its writes or, raising, none of them. Records
    returned are immutable snapshots. Times are Unix seconds supplied by the caller (the
    store never reads a clock).

    Raises :class:`~coordinator.storage.errors.NotFound` for unknown ids and
    :class:`~coordinator.storage.errors.Conflict` for refused writes, as documented per
    method; any other failure of the database is a
    :class:`~coordinator.storage.errors.StorageError`. Arguments that cannot be right, such
    as a model version record of another task, raise ValueError.

    Thread-safety: implementations must be safe to call from one thread at a time (the
    coordinator calls them from its event loop). :class:`~coordinator.storage.SqlStore` may
    also be called from several threads at once: each call runs in its own session and
    transaction.
    """

    # -- tasks -------------------------------------------------------------------------

    @abc.abstractmethod
    def create_task(
        self, task_id: str, spec_json: str, initial_version: ModelVersionRecord, now: float
    ) -> TaskRecord:
        """Inserts a RUNNING task (no round committed, ``model_version`` that of
        ``initial_version``, normally 0) and its initial model version, in one transaction.

        Conflict if the task id exists. ValueError if ``initial_version`` is of another task.
        """

    @abc.abstractmethod
    def get_task(self, task_id: str) -> TaskRecord:
        """NotFound if there is no such task."""

    @abc.abstractmethod
    def list_tasks(self) -> list[TaskRecord]:
        """All tasks, oldest first (by ``created_at``, then id)."""

    @abc.abstractmethod
    def set_task_state(self, task_id: str, state: TaskState, reason: str = "") -> TaskRecord:
        """Sets the state and its reason (replacing the previous reason). The store imposes no
        order on task states; the round logic does. NotFound if there is no such task."""

    # -- rounds ------------------------------------------------------------------------

    @abc.abstractmethod
    def open_round(
        self, task_id: str, round_number: int, goal: int, started_at: float, deadline: float
    ) -> RoundRecord:
        """Opens a new SELECTING attempt of ``round_number``: attempt 1 + the attempts of that
        number so far.

        NotFound if there is no such task. Conflict if the task is not RUNNING, already has a
        round that is not final, or already committed ``round_number``.
        """

    @abc.abstractmethod
    def get_round(self, round_id: int) -> RoundRecord:
        """NotFound if there is no such round."""

    @abc.abstractmethod
    def list_rounds(self, task_id: str) -> list[RoundRecord]:
        """Every attempt of the task, ordered by (round_number, attempt). NotFound if there is
        no such task."""

    @abc.abstractmethod
    def open_round_of(self, task_id: str) -> RoundRecord | None:
        """The task's round that is not final, if any (there is at most one). NotFound if
        there is no such task."""

    @abc.abstractmethod
    def set_round_state(
        self,
        round_id: int,
        state: RoundState,
        *,
        now: float,
        failure_reason: str = "",
        deadline: float | None = None,
    ) -> RoundRecord:
        """Moves the round along one of :data:`ROUND_TRANSITIONS`; a final state sets
        ``ended_at = now``. A non-empty ``failure_reason`` and a ``deadline`` that is not None
        replace the stored ones.

        NotFound if there is no such round; Conflict, naming both states, for a transition not
        allowed (COMMITTED included: that is :meth:`commit_round`'s job).
        """

    # -- participants ------------------------------------------------------------------

    @abc.abstractmethod
    def add_participants(
        self, round_id: int, participants: Sequence[tuple[str, str]], now: float
    ) -> None:
        """Admits ``(device_id, token_hash)`` pairs as SELECTED and adds their number to the
        round's ``selected``, in one transaction.

        NotFound if there is no such round. Conflict if a device is already a participant of
        the round (or listed twice), or the round is final; then no one is added.
        """

    @abc.abstractmethod
    def get_participant(self, round_id: int, device_id: str) -> ParticipantRecord:
        """NotFound if the device is not a participant of the round."""

    @abc.abstractmethod
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
        """Sets the participant's state and ``updated_at``; ``num_examples`` (unless 0) and
        ``metrics`` (unless None) replace the stored ones. The round's ``reports`` counts the
        participants in state REPORTED, updated in the same transaction.

        NotFound if the device is not a participant of the round. Conflict if it is already
        REPORTED and ``state`` is REPORTED again (a report is counted once).
        """

    @abc.abstractmethod
    def list_participants(self, round_id: int) -> list[ParticipantRecord]:
        """The round's participants, by device id. NotFound if there is no such round."""

    def write_participants(self, writes: Sequence[ParticipantWrite]) -> None:
        """Applies ``writes`` in order, each as :meth:`add_participants`
        (:class:`~coordinator.storage.records.NewParticipants`) or
        :meth:`set_participant_state` would, raising what they raise.

        :class:`~coordinator.storage.SqlStore` and :class:`~coordinator.storage.InMemoryStore`
        apply the whole batch atomically (SqlStore in one transaction: one commit instead of
        one per write); this default applies them one call at a time. A store that wraps
        another in its ``inner`` attribute (metrics, events) hands the batch to it whole.
        """
        inner = getattr(self, "inner", None)
        if isinstance(inner, Store):
            inner.write_participants(writes)
            return
        for write in writes:
            if isinstance(write, NewParticipants):
                self.add_participants(write.round_id, write.participants, write.now)
            else:
                self.set_participant_state(write.round_id, write.device_id, write.state,
                                           now=write.now, num_examples=write.num_examples,
                                           metrics=write.metrics)

    # -- commits and model versions ----------------------------------------------------

    @abc.abstractmethod
    def commit_round(
        self, round_id: int, version: ModelVersionRecord, metrics: Mapping[str, float], now: float
    ) -> RoundRecord:
        """In one transaction: records ``version``, sets the round COMMITTED (with
        ``model_version``, ``metrics`` and ``ended_at = now``), makes ``version`` the task's
        current model and counts the round in ``rounds_committed``.

        NotFound if there is no such round. Conflict if the round is not AGGREGATING, its
        round number is already committed for the task, or the version number exists; then
        nothing is written. ValueError if ``version`` names another task or round number.
        """

    @abc.abstractmethod
    def update_round_metrics(self, round_id: int, metrics: Mapping[str, float]) -> RoundRecord:
        """Merges ``metrics`` into the round's (new names added, same names replaced), in any
        state; used for server-side evaluation after a commit. NotFound if no such round."""

    @abc.abstractmethod
    def get_model_version(self, task_id: str, version: int) -> ModelVersionRecord:
        """NotFound if the task or that version of it does not exist."""

    @abc.abstractmethod
    def latest_model_version(self, task_id: str) -> ModelVersionRecord:
        """The highest version of the task. NotFound if there is no such task."""

    @abc.abstractmethod
    def list_model_versions(self, task_id: str) -> list[ModelVersionRecord]:
        """Every version of the task, oldest first. NotFound if there is no such task."""

    # -- lifecycle ---------------------------------------------------------------------

    @abc.abstractmethod
    def fail_open_rounds(self, reason: str, now: float) -> list[RoundRecord]:
        """Sets every round that is not final, of every task, FAILED with ``reason`` and
        ``ended_at = now`` (at start-up after a crash: an open round's aggregate was lost).
        Returns them, by round id."""

    @abc.abstractmethod
    def close(self) -> None:
        """Releases connections. The store must not be used afterwards."""
