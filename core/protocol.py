"""What devices and the coordinator say to each other, as plain values.

The wire form is in protos/; protos/convert.py and the transports translate. Both sides
use these types, so neither imports the other.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from core.privacy.spec import LocalDp
from core.secagg.params import SecAggParams
from core.shards import SignedTicket
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
class SecAggPlan:
    """How this round's secure aggregation runs: the parameters every participant uses, the
    round's unique context (bound into every key and ciphertext) and each stage's timeout."""

    params: SecAggParams
    context: bytes
    phase_timeout_s: float


@dataclass(frozen=True)
class PlanPrivacy:
    """What a device does for differential privacy this round.

    ``l2_clip_norm``: the whole update (all tensors together) is scaled to at most this L2
    norm before it leaves the device (before quantization under secure aggregation), the
    sensitivity bound of central DP; it changes per round under adaptive clipping.
    ``report_unclipped``: adaptive clipping; the device also sends 1 if its update fitted
    under the norm, else 0 (a metric in the clear, one more masked value under secure
    aggregation). ``local``: DP-SGD parameters (local mode)."""

    l2_clip_norm: float | None = None
    report_unclipped: bool = False
    local: LocalDp | None = None
    #: Distributed DP: the total noise std of the round's sum in quantization steps; each
    #: device adds N_Z(0, distributed_noise_steps^2 / devices_planned) before masking.
    distributed_noise_steps: float | None = None
    devices_planned: int = 0


#: Metric a device reports with its update under adaptive clipping without secure
#: aggregation: 1.0 if the update fitted under the round's clip norm, else 0.0.
UNCLIPPED_METRIC = "dp_unclipped"


class MetricsPolicy(enum.Enum):
    """How a device's summary metrics (losses, accuracy, example counts) leave it this round.

    ``CLEAR``: next to the update, in the clear (no secure aggregation, no DP: the coordinator
    sees the update itself anyway). ``MASKED``: inside the secure-aggregation vector
    (:func:`core.secagg.encoding.masked_metric_values`), so the coordinator learns only their
    sums. ``WITHHELD``: not at all (differential privacy: nothing outside the accounted
    release leaves the device)."""

    CLEAR = "clear"
    MASKED = "masked"
    WITHHELD = "withheld"


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
    secure_aggregation: SecAggPlan | None = None
    privacy: PlanPrivacy | None = None
    metrics: MetricsPolicy = MetricsPolicy.CLEAR
    #: Set in a round of a sharded task: the update goes to this aggregator shard, with
    #: the ticket (:mod:`core.shards`); None: to the coordinator.
    shard_upload: ShardUpload | None = None


@dataclass(frozen=True)
class ShardUpload:
    """Where a device's clear update goes in a round of a sharded task."""

    address: str
    ticket: SignedTicket


def config_hash(plan: Plan) -> bytes:
    """What a device received for this round (model, training and protocol configuration),
    hashed; devices compare it in the key-advertisement stage of secure aggregation, so a
    server that sends different models to different devices is caught."""
    sa = plan.secure_aggregation
    body = {
        "task": plan.task_id, "round": plan.round_number, "model_sha256": plan.model_sha256,
        "model_version": plan.model_version, "model": plan.model.architecture,
        "arguments": dict(plan.model.arguments),
        "local": [plan.local.epochs, plan.local.batch_size, plan.local.optimizer.value,
                  plan.local.learning_rate, plan.local.momentum],
        "tensors": [[t.name, t.dtype, list(t.shape)] for t in plan.update_tensors],
        # What the plan carries on the wire: the targets the server derived the parameters
        # from (security_failure, correctness_failure) stay with the server, so the hash a
        # device computes and the one the server expects are of the same thing.
        "secagg": None if sa is None else {"params": {
            k: v for k, v in asdict(sa.params).items()
            if k not in ("security_failure", "correctness_failure")},
            "context": sa.context.hex()},
        "privacy": None if plan.privacy is None else asdict(plan.privacy),
        "metrics": plan.metrics.value,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class UpdateHeader:
    participation: Participation
    num_examples: int
    tensors: list[TensorInfo]
    total_bytes: int
    sha256: str
    metrics: Mapping[str, float]
    #: Chosen by the device, one per update (16-64 characters of [A-Za-z0-9_-]) and kept
    #: across retries: a retried upload gets its first attempt's answer. Empty: an older
    #: client, no idempotency.
    upload_id: str = ""
    #: An upload to an aggregator shard carries the plan's ticket; None to the coordinator.
    ticket: SignedTicket | None = None
