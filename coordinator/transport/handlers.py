"""The servicers' gRPC method handlers, with a size limit per method that is checked before a
request is parsed.

Why (outside testing, issue 13): gRPC's receive limit is one number for every method, and
it must fit the largest message (a masked input of secure aggregation, tens of MiB); eight
concurrent check-ins with a 60 MB device id took the coordinator from 460 MB to 1.6 GB, and
malformed protobuf came back as UNKNOWN/INTERNAL. Here each method's request deserializer
first compares the message's size with that method's limit, then parses it. Either failure
becomes a :class:`Refused` value, not an exception (one raised in a deserializer reaches
the client as UNKNOWN/INTERNAL), and the handler wrapper ends the call with
RESOURCE_EXHAUSTED (too large) or INVALID_ARGUMENT (not a valid message) before the servicer
sees it. The messages name the method and the limit, never the content.

========================================  ==================================================
Method                                    Largest request message
========================================  ==================================================
unary device and admin calls              :data:`UNARY_BYTES` (64 KiB)
AdminService.CreateTask                   :data:`SPEC_BYTES` (1 MiB: a spec, model arguments)
DeviceService.UploadUpdate (each message) ``max_chunk_bytes`` + :data:`HEADER_BYTES`
SecAggShareKeys, SecAggUnmask             UNARY_BYTES + :data:`PEER_BYTES` per neighbour of
                                          the running secure task with the most
SecAggMaskedInput                         UNARY_BYTES + the largest masked input of a
                                          running secure task (none running: UNARY_BYTES)
========================================  ==================================================

gRPC's own limit (set where the server is built) still caps every message, and a message
is received whole before any limit here applies; what these limits prevent is parsing,
copying and echoing it.

Handlers are built from the service descriptors, so a method added to a .proto is covered
(with the unary limit) as soon as its servicer implements it; a method the servicer does not
implement is left out, and gRPC answers UNIMPLEMENTED.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from coordinator.settings import CoordinatorSettings
from coordinator.transport.status import (
    Context,
    MalformedMessage,
    MessageTooLarge,
    abort_for,
)
from protos.fedcoord.v1 import admin_pb2, device_pb2

if TYPE_CHECKING:  # the shard process registers its service here without the coordinator's
    from coordinator.rounds.service import CoordinatorService

#: Largest request of a unary call: ids, tokens, attributes, a status report, a proof.
UNARY_BYTES = 64 << 10
#: Largest CreateTask request: the spec with its model's constructor arguments.
SPEC_BYTES = 1 << 20
#: Room for an upload's header (its tensor list) beside the largest chunk.
HEADER_BYTES = 256 << 10
#: Room per neighbour in SecAggShareKeys (a ciphertext) and SecAggUnmask (two shares).
PEER_BYTES = 1 << 10


@dataclass(frozen=True)
class Refused:
    """What a deserializer returns instead of a request it will not parse; ``error`` is the
    exception the handler wrapper turns into the call's status."""

    error: Exception


class Limits(Protocol):
    def of(self, service_name: str, method: str) -> Callable[[], int]:
        """The largest request message of ``service_name``'s ``method``, in bytes (read when
        a message arrives)."""
        ...


class RequestLimits:
    """The coordinator's largest request message of each method, in bytes. Plan-derived limits are read
    from the service when a message arrives (on the event loop, as every service call)."""

    def __init__(self, service: CoordinatorService, settings: CoordinatorSettings) -> None:
        self._service = service
        self._settings = settings

    def of(self, service_name: str, method: str) -> Callable[[], int]:
        """The limit of ``service_name``'s ``method`` (its request messages, one by one)."""
        fixed = {
            ("AdminService", "CreateTask"): SPEC_BYTES,
            ("DeviceService", "UploadUpdate"): self._settings.max_chunk_bytes + HEADER_BYTES,
        }
        if (service_name, method) in fixed:
            value = fixed[service_name, method]
            return lambda: value
        if (service_name, method) == ("DeviceService", "SecAggMaskedInput"):
            return lambda: UNARY_BYTES + self._service.largest_masked_input_bytes()
        if (service_name, method) in (("DeviceService", "SecAggShareKeys"),
                                      ("DeviceService", "SecAggUnmask")):
            return lambda: UNARY_BYTES + PEER_BYTES * self._service.most_secagg_neighbours()
        return lambda: UNARY_BYTES


def add_device_servicer(servicer: Any, server: grpc.aio.Server, limits: Limits) -> None:
    """Registers ``servicer`` (a DeviceServicer) with per-method request limits."""
    register_service(servicer, server, device_pb2.DESCRIPTOR.services_by_name["DeviceService"],
                     limits)


def add_admin_servicer(servicer: Any, server: grpc.aio.Server, limits: Limits) -> None:
    """Registers ``servicer`` (an AdminServicer) with per-method request limits."""
    register_service(servicer, server, admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
                     limits)


def register_service(servicer: Any, server: grpc.aio.Server, service: ServiceDescriptor,
                     limits: Limits) -> None:
    """Registers ``servicer``'s implementation of ``service``, each method's requests
    checked against ``limits`` before they are parsed."""
    handlers = method_handlers(servicer, service, limits)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    # As the generated add_*_to_server does: registered methods skip the generic lookup.
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(service.full_name, handlers)


def method_handlers(servicer: Any, service: ServiceDescriptor, limits: Limits
                    ) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """One handler per method ``servicer`` implements (an ``async def`` or async
    generator), each with a deserializer that checks the method's limit first."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name, None)
        if not (inspect.iscoroutinefunction(behaviour)
                or inspect.isasyncgenfunction(behaviour)):
            continue  # not implemented: gRPC answers UNIMPLEMENTED
        handlers[method.name] = _handler(method, behaviour, limits.of(service.name, method.name))
    return handlers


def _handler(method: MethodDescriptor, behaviour: Any, limit: Callable[[], int]
             ) -> grpc.RpcMethodHandler[Any, Any]:
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    deserialize = checked_deserializer(request_cls, method.name, limit)
    serialize = response_cls.SerializeToString
    if method.client_streaming:
        if method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _stream_stream(behaviour), request_deserializer=deserialize,
                response_serializer=serialize)
        return grpc.stream_unary_rpc_method_handler(
            _stream_unary(behaviour), request_deserializer=deserialize,
            response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _unary_stream(behaviour), request_deserializer=deserialize,
            response_serializer=serialize)
    return grpc.unary_unary_rpc_method_handler(
        _unary_unary(behaviour), request_deserializer=deserialize,
        response_serializer=serialize)


def checked_deserializer(request_cls: Any, method: str, limit: Callable[[], int]
                         ) -> Callable[[bytes], object]:
    """Parses a request of ``method`` unless it is over ``limit()`` bytes or not a valid
    ``request_cls`` message; then a :class:`Refused` instead (never an exception)."""
    name = request_cls.DESCRIPTOR.name

    def deserialize(data: bytes) -> object:
        bound = limit()
        if len(data) > bound:
            return Refused(MessageTooLarge(
                f"a {method} request of {len(data)} bytes is over this method's limit of "
                f"{bound} bytes"))
        try:
            return request_cls.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, or the parser's own limits
            return Refused(MalformedMessage(
                f"the {method} request is not a valid {name} message"))

    return deserialize


def _unary_unary(behaviour: Any) -> Callable[[Any, Context], Any]:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, Refused):
            await abort_for(request.error, context)
        return await behaviour(request, context)

    return handle


def _unary_stream(behaviour: Any) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, Refused):
            await abort_for(request.error, context)
        async for response in behaviour(request, context):
            yield response

    return handle


def _stream_unary(behaviour: Any) -> Callable[[AsyncIterator[Any], Context], Any]:
    async def handle(requests: AsyncIterator[Any], context: Context) -> Any:
        return await behaviour(_checked(requests), context)

    return handle


def _stream_stream(behaviour: Any
                   ) -> Callable[[AsyncIterator[Any], Context], AsyncIterator[Any]]:
    async def handle(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for response in behaviour(_checked(requests), context):
            yield response

    return handle


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The stream's messages; a refused one raises its error where the servicer reads it."""
    async for request in requests:
        if isinstance(request, Refused):
            raise request.error
        yield request


__all__ = [
    "HEADER_BYTES",
    "PEER_BYTES",
    "SPEC_BYTES",
    "UNARY_BYTES",
    "Refused",
    "RequestLimits",
    "add_admin_servicer",
    "add_device_servicer",
    "checked_deserializer",
    "method_handlers",
]
