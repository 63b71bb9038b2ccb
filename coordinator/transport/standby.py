"""A standby replica's gate (:mod:`coordinator.replication`): while the replica does not
lead, every device call and every admin call that changes a task is answered UNAVAILABLE,
naming the leader's address when one is known. A device agent given several coordinator
addresses moves on to its next one on UNAVAILABLE; admin reads are served from the
database as on the leader.

It stands first among the interceptors: a refused call costs no authentication work (a
check-in's proof is not spent on a replica that cannot take it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

_DEVICE_PREFIX = "/fedcoord.v1.DeviceService/"
#: Admin calls that only the leader may serve: they change the rounds' state.
_LEADER_ONLY_ADMIN = frozenset({"/fedcoord.v1.AdminService/CreateTask",
                                "/fedcoord.v1.AdminService/CancelTask"})


def leader_only(method: str) -> bool:
    """Whether a standby refuses ``method`` (a full gRPC method name)."""
    return method.startswith(_DEVICE_PREFIX) or method in _LEADER_ONLY_ADMIN


class StandbyGate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """``refusal()`` is None while this replica leads (or always, without replicas), else
    the message a refused call gets; it is called on the event loop for each call."""

    def __init__(self, refusal: Callable[[], str | None]) -> None:
        self._refusal = refusal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not leader_only(handler_call_details.method):
            return handler
        message = self._refusal()
        if message is None:
            return handler
        shape = dict(request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)

        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]
                                ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
            yield  # pragma: no cover - abort raises

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse, **shape)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, **shape)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse, **shape)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **shape)
