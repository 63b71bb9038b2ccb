"""The in-memory state of running tasks and their open rounds, shared by the round service's
parts (tasks, round machine, participation). Plain mutable records with no behaviour; the
database holds the durable truth, and this is rebuilt from it at start-up
(:meth:`coordinator.rounds.tasks.Tasks.recover`).

Not thread-safe: only the service's event loop touches it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from coordinator.rounds.aggregators import Aggregator
from coordinator.rounds.asynchronous import FedBuff
from coordinator.rounds.declines import Declines
from coordinator.rounds.secure import SecureRound
from coordinator.rounds.selection import Selector
from coordinator.rounds.shards import ShardRound
from coordinator.rounds.uploads import Receipt, Upload
from coordinator.storage.records import ModelVersionRecord
from core.privacy.task import TaskPrivacy
from core.secagg.params import SecAggParams
from core.shards import SignedTicket
from core.tensors import TensorInfo
from core.types import RoundState, TaskSpec

if TYPE_CHECKING:
    from coordinator.rounds.evaluation_tasks import EvaluationSetup


def hash_token(token: str) -> str:
    """What the store keeps of a participation token (the token itself never is)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class LoadedModel:
    """A task's current model version, in memory."""

    version: int
    params: dict[str, np.ndarray]
    infos: list[TensorInfo]
    nbytes: int
    record: ModelVersionRecord
    optimizer_state: dict[str, np.ndarray] | None

    @property
    def size(self) -> int:
        """Float32 parameters of an update of this model."""
        return self.nbytes // 4


@dataclass
class Seat:
    """A device admitted to a round: its token (hashed as stored, and in the clear to answer
    a repeated check-in), whether it also evaluates, and the answer to its upload."""

    token_hash: str
    token: str
    evaluate: bool
    #: The answer to the device's finished upload with an upload id, for its retries.
    receipt: Receipt | None = None
    #: The round the device was admitted to (its participation's round number): the open
    #: round's, except for an asynchronous seat carried over from an earlier version.
    round_number: int = 0
    #: The model version the device trains on (the current one when it was admitted).
    version: int = 0
    #: Asynchronous tasks: when the seat expires if no update came (round_deadline_s after
    #: admission); synchronous seats last as long as their round.
    deadline: float = math.inf
    #: A sharded round: the index of the aggregator shard the device uploads to, and the
    #: ticket it carries there (signed when its plan is first asked for).
    shard: int | None = None
    ticket: SignedTicket | None = None


@dataclass
class OpenRound:
    round_id: int
    round_number: int
    state: RoundState
    started: float
    deadline: float
    selector: Selector
    aggregator: Aggregator
    #: Reports that close the round: clients_per_round, or (DP) every admitted device.
    goal: int
    seats: dict[str, Seat] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)
    errored: set[str] = field(default_factory=set)
    #: Uploads in progress, by device.
    uploading: dict[str, Upload] = field(default_factory=dict)
    secure: SecureRound | None = None
    #: Asynchronous tasks: the staleness of each accepted update, and how many were
    #: rejected as too stale, for the version's metrics.
    staleness: list[int] = field(default_factory=list)
    late: int = 0
    #: A round whose uploads go to aggregator shards (:mod:`coordinator.rounds.shards`).
    shards: ShardRound | None = None


@dataclass
class RunningTask:
    task_id: str
    spec: TaskSpec
    model: LoadedModel
    round: OpenRound | None = None
    secagg: SecAggParams | None = None
    privacy: TaskPrivacy | None = None
    failed_attempts: int = 0
    #: Seats of the last closed attempt, so its late devices hear "closed", not "not selected".
    closed_seats: dict[str, Seat] = field(default_factory=dict)
    #: Asynchronous (FedBuff) tasks: the policy; None for synchronous rounds.
    fedbuff: FedBuff | None = None
    #: A commit is running off the event loop; no round is open until it lands.
    committing: bool = False
    #: Devices that declined the task, by reason; the rule that fails a task none can run.
    declines: Declines = field(default_factory=lambda: Declines.for_task(1))
    #: An update of the task was accepted at some point (a committed round counts): then
    #: declines never fail it (:meth:`Declines.verdict`).
    any_accepted: bool = False
    #: Kind ``evaluate``: the report layout devices upload; None for a training task.
    evaluation: EvaluationSetup | None = None
    #: Experiments: devices whose report is in a committed round. Each device counts once
    #: per experiment (the statistics take every report for a new device), so these are not
    #: offered the task again; rebuilt from the store at a restart.
    counted_devices: set[str] = field(default_factory=set)

    @property
    def counts_devices_once(self) -> bool:
        return self.evaluation is not None and self.spec.evaluate.experiment is not None

    @property
    def upload_tensors(self) -> list[TensorInfo]:
        """What a device uploads: an update of the model, or an evaluation report."""
        return self.evaluation.tensors if self.evaluation is not None else self.model.infos

    @property
    def upload_nbytes(self) -> int:
        return self.evaluation.nbytes if self.evaluation is not None else self.model.nbytes
