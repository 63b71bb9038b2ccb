"""Which answers a device retries: a call the coordinator's gRPC server shed under load
(CANCELLED at once, its backlog full) is retried with backoff like an unreachable
coordinator, while a refusal of the request itself is final."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from device_agent.errors import Rejected
from device_agent.transport.client import DeviceClient, RetryPolicy


class Answer(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def flaky(failures: list[grpc.StatusCode]) -> tuple[list[int], Callable[[], str]]:
    calls = [0]

    def call() -> str:
        calls[0] += 1
        if failures:
            raise Answer(failures.pop(0), "shed")
        return "answer"

    return calls, call


def client() -> DeviceClient:
    return DeviceClient("127.0.0.1:9", policy=RetryPolicy(base_s=0.001, cap_s=0.002))


def test_calls_shed_with_cancelled_are_retried_until_answered() -> None:
    device = client()
    calls, call = flaky([grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED,
                         grpc.StatusCode.UNAVAILABLE])
    assert device._retrying(call) == "answer"
    assert calls[0] == 4
    device.close()


def test_a_refused_request_is_not_retried() -> None:
    device = client()
    calls, call = flaky([grpc.StatusCode.INVALID_ARGUMENT])
    with pytest.raises(Rejected, match="INVALID_ARGUMENT"):
        device._retrying(call)
    assert calls[0] == 1
    device.close()
