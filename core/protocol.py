"""What devices and the coordinator say to each other, as plain values.

The wire form is in protos/; protos/convert.py and the transports translate. Both sides
use these types, so neither imports the other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from core.tensors import TensorInfo
from core.types import LocalTraining, ModelSpec


class CheckInOutcome(enum.Enum):
    ACCEPTED = "accepted"
    RETRY_LATER = "retry_later"
    NO_TASK = "no_task"
    FINISHED = "finished"


@dataclass(frozen=True)
class CheckInResult:
    outcome: CheckInOutcome
    task_id: str = ""
    round_number: int = 0
    token: str = ""
    retry_after_s: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Participation:
    device_id: str
    task_id: str
    round_number: int
    token: str


@dataclass(frozen=True)
class Plan:
    task_id: str
    round_number: int
    model: ModelSpec
    model_version: int
    model_sha256: str
    model_size_bytes: int
    local: LocalTraining
    evaluate: bool
    deadline: float
    max_update_bytes: int
    max_chunk_bytes: int
    update_tensors: list[TensorInfo]
    seed: int


@dataclass(frozen=True)
class UpdateHeader:
    participation: Participation
    num_examples: int
    tensors: list[TensorInfo]
    total_bytes: int
    sha256: str
    metrics: Mapping[str, float]
