"""Per-method request limits: a request over its method's limit or not valid protobuf
becomes a Refused value (never an exception, which gRPC would send as UNKNOWN), before the
servicer sees it; plan-derived limits follow the running tasks."""

from __future__ import annotations

from typing import Any

from coordinator.settings import CoordinatorSettings
from coordinator.transport.handlers import (
    HEADER_BYTES,
    PEER_BYTES,
    SPEC_BYTES,
    UNARY_BYTES,
    Refused,
    RequestLimits,
    checked_deserializer,
    method_handlers,
)
from coordinator.transport.status import MalformedMessage, MessageTooLarge, bounded_details
from protos.fedcoord.v1 import device_pb2


class FakeService:
    masked = 0
    neighbours = 0

    def largest_masked_input_bytes(self) -> int:
        return self.masked

    def most_secagg_neighbours(self) -> int:
        return self.neighbours


def limits(service: FakeService) -> RequestLimits:
    return RequestLimits(service, CoordinatorSettings(max_chunk_bytes=1 << 20))  # type: ignore[arg-type]


def test_an_oversized_or_malformed_request_is_refused_without_parsing_or_echoing() -> None:
    deserialize = checked_deserializer(device_pb2.CheckInRequest, "CheckIn", lambda: 100)
    ok = device_pb2.CheckInRequest(device_id="d").SerializeToString()
    assert deserialize(ok) == device_pb2.CheckInRequest(device_id="d")
    big = deserialize(device_pb2.CheckInRequest(device_id="secret" * 50).SerializeToString())
    assert isinstance(big, Refused) and isinstance(big.error, MessageTooLarge)
    assert "limit of 100 bytes" in str(big.error) and "secret" not in str(big.error)
    for garbage in (b"\xff\xff\xff", b"\x12\x02\xff\xfe"):  # not protobuf; not UTF-8
        bad = deserialize(garbage)
        assert isinstance(bad, Refused) and isinstance(bad.error, MalformedMessage)
        assert "not a valid CheckInRequest" in str(bad.error)


def test_limits_are_small_for_unary_calls_and_follow_the_plans_for_secagg() -> None:
    service = FakeService()
    of = limits(service).of
    assert of("DeviceService", "CheckIn")() == UNARY_BYTES
    assert of("DeviceService", "Enroll")() == UNARY_BYTES
    assert of("AdminService", "GetTask")() == UNARY_BYTES
    assert of("AdminService", "CreateTask")() == SPEC_BYTES
    assert of("DeviceService", "UploadUpdate")() == (1 << 20) + HEADER_BYTES
    masked, share = of("DeviceService", "SecAggMaskedInput"), of("DeviceService", "SecAggUnmask")
    assert masked() == UNARY_BYTES and share() == UNARY_BYTES
    service.masked, service.neighbours = 40 << 20, 30
    assert masked() == UNARY_BYTES + (40 << 20)
    assert share() == UNARY_BYTES + 30 * PEER_BYTES


def test_only_implemented_methods_get_handlers() -> None:
    class Partial:
        async def CheckIn(self, request: Any, context: Any) -> Any:
            return None

        def GetPlan(self, request: Any, context: Any) -> Any:  # the generated stub's kind
            raise NotImplementedError

    service = device_pb2.DESCRIPTOR.services_by_name["DeviceService"]
    handlers = method_handlers(Partial(), service, limits(FakeService()))
    assert list(handlers) == ["CheckIn"]


def test_status_messages_are_bounded() -> None:
    assert bounded_details("short") == "short"
    long = bounded_details("x" * 50_000)
    assert len(long) <= 1000 and long.endswith("(50000 characters)")
