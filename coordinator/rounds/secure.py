"""A round's secure aggregation as the coordinator runs it: the SecAgg+ server of core.secagg,
stage deadlines, and the replies each device collects when a stage closes.

Stages after training (see :mod:`core.secagg.messages`)::

    ADVERTISE --goal reached / nobody pending / round deadline--> SHARE_KEYS
    SHARE_KEYS --all in / phase deadline--> MASKED_INPUT --...--> UNMASK --...--> result

Every wait is bounded: advertisement by the round's deadline, each later stage by
``phase_timeout_s`` from the close of the previous one. The coordinator never holds a
device's update in the clear: only masked vectors, and at the end their sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from coordinator.rounds.errors import CoordinatorError, Duplicate, InvalidRequest, Late
from core.protocol import SecAggPlan
from core.secagg import encoding
from core.secagg.errors import (
    SecAggDuplicate,
    SecAggRejected,
    SecAggRoundFull,
    SecAggWrongStage,
)
from core.secagg.messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    RingVector,
    ShareKeysRequest,
    ShareKeysResponse,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from core.secagg.params import SecAggParams
from core.secagg.server import SecAggResult, SecAggServer


class Aborted(Late):
    """The secure aggregation of this round was aborted; nothing was released."""


#: How a refused message is reported to its sender, by the refusal's class: the first entry
#: it is an instance of, so SecAggRejected, the catch-all (a malformed message or an
#: unexpected sender), stays last. A full round leaves the device no place in this protocol:
#: Late, like a closed stage.
_REJECTIONS: dict[type[SecAggRejected], type[CoordinatorError]] = {
    SecAggDuplicate: Duplicate,
    SecAggWrongStage: Late,
    SecAggRoundFull: Late,
    SecAggRejected: InvalidRequest,
}


def _rejection(exc: SecAggRejected) -> CoordinatorError:
    error = next(e for cls, e in _REJECTIONS.items() if isinstance(exc, cls))
    return error(str(exc))


@dataclass
class SecureRound:
    plan: SecAggPlan
    server: SecAggServer[str]
    goal: int  # close advertisement once this many devices advertised
    stage_deadline: float = math.inf
    replies: dict[Stage, Mapping[str, object]] = field(default_factory=dict)
    clipped_values: int = 0
    result: SecAggResult[str] | None = None

    @classmethod
    def open(cls, plan: SecAggPlan, goal: int) -> SecureRound:
        return cls(plan, SecAggServer(plan.params, plan.context), goal)

    @property
    def stage(self) -> Stage:
        return self.server.stage

    # ---------------------------------------------------------------- device messages

    def advertise(self, device: str, message: KeyAdvertisement,
                  expected_config_hash: bytes | None = None) -> None:
        self._call(Stage.ADVERTISE, lambda: self.server.add_advertisement(
            device, message, expected_config_hash))

    def share_keys(self, device: str, message: ShareKeysResponse) -> None:
        self._call(Stage.SHARE_KEYS, lambda: self.server.add_shares(device, message))

    def masked_input(self, device: str, vector: RingVector, clipped: int) -> None:
        self._call(Stage.MASKED_INPUT, lambda: self.server.add_masked_input(device, vector))
        self.clipped_values += clipped

    def unmask(self, device: str, message: UnmaskResponse) -> None:
        self._call(Stage.UNMASK, lambda: self.server.add_unmask(device, message))

    def reply(self, device: str, after: Stage) -> object | None:
        """This device's message for the stage after ``after``; None while ``after`` is open.
        Raises Late when the device is no longer part of the protocol."""
        if self.server.aborted is not None:
            raise Aborted(f"secure aggregation aborted: {self.server.aborted}")
        if self.server.stage <= after:
            return None
        replies = self.replies.get(after, {})
        if device not in replies:
            raise Late(f"this device is no longer part of the secure aggregation (it missed "
                       f"the {after.name.lower()} stage's deadline or was left out)")
        return replies[device]

    # ---------------------------------------------------------------- stage closing

    def due(self, now: float, round_deadline: float, pending_seats: int) -> bool:
        """Whether the current stage should close now."""
        stage = self.server.stage
        if stage is Stage.ADVERTISE:
            return (self.server.advertised >= self.goal or pending_seats <= 0
                    or now >= round_deadline)
        if stage is Stage.DONE:
            return False
        return not self.server.pending() or now >= self.stage_deadline

    def close_stage(self, now: float) -> None:
        """Closes the current stage; SecAggAborted if the protocol cannot finish."""
        stage = self.server.stage
        replies: Mapping[str, object]
        if stage is Stage.ADVERTISE:
            replies = self.server.close_advertise()
        elif stage is Stage.SHARE_KEYS:
            replies = self.server.close_shares()
        elif stage is Stage.MASKED_INPUT:
            replies = self.server.close_masked_inputs()
        else:
            self.result = self.server.finish()
            return
        self.replies[stage] = replies
        self.stage_deadline = now + self.plan.phase_timeout_s

    def _call(self, stage: Stage, action: Callable[[], None]) -> None:
        if self.server.aborted is not None:
            raise Aborted(f"secure aggregation aborted: {self.server.aborted}")
        if self.server.stage < stage:
            raise Late(f"secure aggregation has not reached the {stage.name.lower()} stage "
                       f"(now {self.server.stage.name.lower()}); messages must come in order")
        if self.server.stage > stage:
            raise Late(f"secure aggregation is past the {stage.name.lower()} stage "
                       f"(now {self.server.stage.name.lower()}); this message is too late")
        try:
            action()
        except SecAggRejected as exc:
            raise _rejection(exc) from None


__all__ = [
    "Aborted",
    "KeyAdvertisement",
    "MaskedInputRequest",
    "SecureRound",
    "ShareKeysRequest",
    "ShareKeysResponse",
    "UnmaskRequest",
    "UnmaskResponse",
]


@dataclass(frozen=True)
class DecodedSum:
    """A finished secure round's unmasked sum, decoded (:func:`core.secagg.encoding.
    decode_mean`): ``mean`` is the survivors' weighted mean of every encoded coordinate,
    ``weight`` their weight total; ``public`` the protocol's facts every release carries
    (dropouts, clipped coordinates, neighbours, threshold)."""

    mean: npt.NDArray[np.float64]
    weight: int
    survivors: int
    params: SecAggParams
    public: Mapping[str, float]


def decode_sum(secure: SecureRound) -> DecodedSum:
    """The decoded sum of a secure round whose unmask stage finished (the training and the
    evaluation aggregators both release from it).

    Raises:
        ValueError: the sum cannot be decoded (the caller refuses the release with it).
    """
    result = secure.result
    assert result is not None, "decode_sum needs the unmasked result"
    params = secure.plan.params
    survivors = len(result.survivors)
    mean, weight = encoding.decode_mean(result.total, survivors, params)
    return DecodedSum(mean, weight, survivors, params, {
        "secagg_dropped": float(len(result.dropped)),
        "secagg_clipped_values": float(secure.clipped_values),
        "secagg_neighbours": float(params.neighbours),
        "secagg_threshold": float(params.threshold),
    })
