"""The server's refusals are typed: a caller tells a replay from a malformed message, a message
of the wrong stage or a full round by the class, never by the text. Every refusal changes
nothing, and everything core.secagg raises sits under one root."""

from __future__ import annotations

import random

import numpy as np
import pytest

from core.errors import CoreError
from core.secagg import errors, keys, shamir
from core.secagg.client import SecAggClient
from core.secagg.errors import (
    SecAggDuplicate,
    SecAggError,
    SecAggRejected,
    SecAggRoundFull,
    SecAggWrongStage,
)
from core.secagg.messages import KeyAdvertisement, ShareKeysResponse, Stage, UnmaskResponse
from core.secagg.params import SecAggParamError, SecAggParams
from core.secagg.server import SecAggServer

CTX = b"task-e/round/1"
N = 4


def _params() -> SecAggParams:
    return SecAggParams(num_devices=N, neighbours=N - 1, threshold=3, value_bits=16,
                        ring_bits=32, clip=1.0, weight_cap=100,
                        security_failure=0.0, correctness_failure=0.0)


class Round:
    """N honest devices; ``to(stage)`` runs every device through the stages before it."""

    def __init__(self) -> None:
        self.p = _params()
        self.clients = {f"dev-{i}": SecAggClient(self.p, CTX, b"h" * 32) for i in range(N)}
        self.xs = {w: np.arange(8, dtype=np.uint32) + i for i, w in enumerate(self.clients)}
        self.server: SecAggServer[str] = SecAggServer(self.p, CTX, random.Random(0))
        self.adverts = {w: c.advertise() for w, c in self.clients.items()}
        self.sent: dict[str, object] = {}

    def to(self, stage: Stage) -> None:
        for w, advert in self.adverts.items():
            self.server.add_advertisement(w, advert)
        if stage is Stage.ADVERTISE:
            return
        requests = self.server.close_advertise()
        shares = {w: self.clients[w].share_keys(r) for w, r in requests.items()}
        for w, response in shares.items():
            self.server.add_shares(w, response)
        self.sent = dict(shares)
        if stage is Stage.SHARE_KEYS:
            return
        masked = {w: self.clients[w].mask(r, self.xs[w])
                  for w, r in self.server.close_shares().items()}
        for w, vector in masked.items():
            self.server.add_masked_input(w, vector)
        self.sent = dict(masked)
        if stage is Stage.MASKED_INPUT:
            return
        unmasks = {w: self.clients[w].unmask(r)
                   for w, r in self.server.close_masked_inputs().items()}
        for w, response in unmasks.items():
            self.server.add_unmask(w, response)
        self.sent = dict(unmasks)


def _resend(rnd: Round, stage: Stage, who: str) -> None:
    if stage is Stage.ADVERTISE:
        rnd.server.add_advertisement(who, rnd.adverts[who])
    elif stage is Stage.SHARE_KEYS:
        message = rnd.sent[who]
        assert isinstance(message, ShareKeysResponse)
        rnd.server.add_shares(who, message)
    elif stage is Stage.MASKED_INPUT:
        vector = rnd.sent[who]
        assert isinstance(vector, np.ndarray)
        rnd.server.add_masked_input(who, vector)
    else:
        response = rnd.sent[who]
        assert isinstance(response, UnmaskResponse)
        rnd.server.add_unmask(who, response)


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE_KEYS, Stage.MASKED_INPUT,
                                   Stage.UNMASK])
def test_a_second_message_of_the_same_stage_is_a_duplicate_and_the_first_stands(
    stage: Stage,
) -> None:
    rnd = Round()
    rnd.to(stage)
    with pytest.raises(SecAggDuplicate, match="already"):
        _resend(rnd, stage, "dev-1")
    assert rnd.server.stage is stage
    if stage is Stage.UNMASK:  # the round still ends in the exact sum
        out = rnd.server.finish()
        expected = np.zeros(8, dtype=np.uint32)
        for w in out.survivors:
            expected += rnd.xs[w]
        assert np.array_equal(out.total, expected)


def test_a_message_for_another_stage_is_a_wrong_stage_refusal() -> None:
    rnd = Round()
    rnd.to(Stage.SHARE_KEYS)
    with pytest.raises(SecAggWrongStage, match="share_keys stage, not advertise"):
        rnd.server.add_advertisement("dev-9", SecAggClient(rnd.p, CTX, b"h" * 32).advertise())
    with pytest.raises(SecAggWrongStage, match="not unmask"):
        rnd.server.add_unmask("dev-1", UnmaskResponse((), ()))


def test_an_advertisement_beyond_the_cohort_is_refused_as_a_full_round() -> None:
    rnd = Round()
    rnd.to(Stage.ADVERTISE)
    extra = SecAggClient(rnd.p, CTX, b"h" * 32).advertise()
    with pytest.raises(SecAggRoundFull, match=f"already has {N} participants"):
        rnd.server.add_advertisement("dev-9", extra)
    assert rnd.server.advertised == N


def test_malformed_messages_and_strangers_are_plain_rejections() -> None:
    """Neither duplicates nor stage errors, even where the text would suggest otherwise."""
    rnd = Round()
    short = KeyAdvertisement(b"k" * 31, b"m" * 32, b"h" * 32)
    with pytest.raises(SecAggRejected, match="public key") as bad_key:
        rnd.server.add_advertisement("dev-0", short)
    rnd.to(Stage.SHARE_KEYS)
    with pytest.raises(SecAggRejected, match="not a participant") as stranger:
        rnd.server.add_shares("stranger", ShareKeysResponse(()))
    for info in (bad_key, stranger):
        assert type(info.value) is SecAggRejected


def test_every_secagg_error_has_one_root_under_core_error() -> None:
    for cls in (SecAggRejected, SecAggDuplicate, SecAggWrongStage, SecAggRoundFull,
                errors.SecAggAborted, errors.SecAggRefused, SecAggParamError,
                shamir.ShamirError, keys.CryptoError):
        assert issubclass(cls, SecAggError)
    assert issubclass(SecAggError, CoreError)


def test_the_errors_keep_their_old_import_paths() -> None:
    from core.secagg.client import SecAggRefused
    from core.secagg.server import SecAggAborted
    from core.secagg.server import SecAggRejected as Rejected

    assert SecAggRefused is errors.SecAggRefused
    assert SecAggAborted is errors.SecAggAborted
    assert Rejected is SecAggRejected
