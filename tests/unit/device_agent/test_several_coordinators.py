"""An agent given several coordinator addresses (replicas): a call refused UNAVAILABLE (a
standby, or a coordinator that is down) or timed out goes to the next address at once; the
backoff grows only after every address failed; a busy coordinator (CANCELLED) keeps the
calls; and later calls stay where one was answered."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from device_agent.transport.client import DeviceClient, RetryPolicy, parse_targets

A, B, C = "127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11"


class Answer(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "refused"


def scripted(device: DeviceClient, answers: dict[str, list[grpc.StatusCode]]
             ) -> tuple[list[str], Callable[[], str]]:
    """A call that fails at each address with its next scripted code, then answers; it
    records the address of every attempt."""
    seen: list[str] = []

    def call() -> str:
        seen.append(device.target)
        pending = answers.get(device.target, [])
        if pending:
            raise Answer(pending.pop(0))
        return device.target

    return seen, call


def test_addresses_are_comma_separated_or_a_sequence() -> None:
    assert parse_targets(f"{A}, {B}") == [A, B]
    assert parse_targets([A, f"{B},{C}"]) == [A, B, C]
    with pytest.raises(ValueError, match="no coordinator address"):
        parse_targets(" , ")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_refused_address_hands_the_call_to_the_next_at_once(code: grpc.StatusCode) -> None:
    device = DeviceClient(f"{A},{B}", policy=RetryPolicy(base_s=30.0, cap_s=30.0))
    seen, call = scripted(device, {A: [code]})
    started = time.monotonic()

    assert device._retrying(call) == B

    assert seen == [A, B] and time.monotonic() - started < 5, "no backoff before the next"
    assert device._retrying(call) == B and seen[-1] == B, "later calls stay at B"
    device.close()


def test_after_a_full_pass_of_refusals_the_client_backs_off_and_starts_over() -> None:
    device = DeviceClient([A, B], policy=RetryPolicy(base_s=0.001, cap_s=0.002))
    unavailable = grpc.StatusCode.UNAVAILABLE
    seen, call = scripted(device, {A: [unavailable], B: [unavailable, unavailable]})

    assert device._retrying(call) == A

    assert seen == [A, B, A]
    device.close()


def test_a_busy_coordinator_keeps_the_calls() -> None:
    device = DeviceClient([A, B], policy=RetryPolicy(base_s=0.001, cap_s=0.002))
    seen, call = scripted(device, {A: [grpc.StatusCode.CANCELLED]})

    assert device._retrying(call) == A

    assert seen == [A, A]
    device.close()
