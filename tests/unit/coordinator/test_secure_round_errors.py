"""SecureRound reports a refused SecAgg message by the refusal's class, not by its wording:
a replay is a Duplicate, a full round Late, anything else an InvalidRequest; the message
reaches the device unchanged."""

from __future__ import annotations

import pytest

from coordinator.rounds.errors import CoordinatorError, Duplicate, InvalidRequest, Late
from coordinator.rounds.secure import SecureRound
from core.protocol import SecAggPlan
from core.secagg.client import SecAggClient
from core.secagg.errors import (
    SecAggDuplicate,
    SecAggRejected,
    SecAggRoundFull,
    SecAggWrongStage,
)
from core.secagg.messages import KeyAdvertisement
from core.secagg.params import SecAggParams
from core.secagg.server import SecAggServer

PARAMS = SecAggParams(num_devices=3, neighbours=2, threshold=2, value_bits=16, ring_bits=32,
                      clip=1.0, weight_cap=100, security_failure=0.0, correctness_failure=0.0)
PLAN = SecAggPlan(PARAMS, b"ctx", phase_timeout_s=5.0)


def advert() -> KeyAdvertisement:
    return SecAggClient(PARAMS, b"ctx", b"h" * 32).advertise()


class RefusingServer(SecAggServer[str]):
    """Refuses every advertisement with a given error."""

    def __init__(self, error: SecAggRejected) -> None:
        super().__init__(PARAMS, b"ctx")
        self.error = error

    def add_advertisement(self, who: str, message: KeyAdvertisement,
                          expected_config_hash: bytes | None = None) -> None:
        raise self.error


@pytest.mark.parametrize(("error", "expected"), [
    (SecAggDuplicate("sent twice"), Duplicate),
    (SecAggRoundFull("no seat left"), Late),
    (SecAggWrongStage("another stage"), Late),
    # The wording once decided the status: "already" meant Duplicate. No more.
    (SecAggRejected("the key was already seen elsewhere"), InvalidRequest),
])
def test_a_refusal_is_mapped_by_its_class(
    error: SecAggRejected, expected: type[CoordinatorError]
) -> None:
    secure = SecureRound(PLAN, RefusingServer(error), goal=3)
    with pytest.raises(expected) as info:
        secure.advertise("d0", advert())
    assert type(info.value) is expected
    assert str(info.value) == str(error)


def test_a_replayed_advertisement_is_a_duplicate_and_a_surplus_one_is_late() -> None:
    secure = SecureRound.open(PLAN, goal=3)
    first = advert()
    secure.advertise("d0", first)
    with pytest.raises(Duplicate, match="d0 already advertised its keys"):
        secure.advertise("d0", first)
    secure.advertise("d1", advert())
    secure.advertise("d2", advert())
    with pytest.raises(Late, match="already has 3 participants"):
        secure.advertise("d3", advert())
    with pytest.raises(InvalidRequest, match="public key"):
        secure.advertise("d4", KeyAdvertisement(b"k", b"m" * 32, b"h" * 32))
