"""A standby replica's gate (:mod:`coordinator.replication`): while the replica does not
lead, it serves only the admin reads (from the database, as on the leader, behind the same
authentication) and answers every other call of ours UNAVAILABLE, naming the leader's address
when one is known: every device call, and every admin call that changes anything (tasks,
tokens, devices). A device agent given several coordinator addresses moves on to its next one
on UNAVAILABLE.

An allow-list, not a deny-list: a change served by a standby would reach the database but not
the leader's caches (a device revoked there would still be admitted by the leader), and a
method added later is refused until it is known to be a read.

It stands first among the interceptors: a refused call costs no authentication work (a
check-in's proof is not spent on a replica that cannot take it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from coordinator.transport.rewrap import rewrap

_OURS = "/fedcoord.v1."
#: The admin calls a standby serves: reads of the database, which change nothing.
STANDBY_READS = frozenset(f"/fedcoord.v1.AdminService/{name}" for name in (
    "GetTask", "ListTasks", "ListRounds", "DownloadModel", "ListEvents", "ListTokens",
    "ListDevices", "ListAudit", "WhoAmI"))


def leader_only(method: str) -> bool:
    """Whether a standby refuses ``method`` (a full gRPC method name): every call of ours but
    the admin reads; health checking and reflection are not ours and stay served."""
    return method.startswith(_OURS) and method not in STANDBY_READS


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
        async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)

        async def refuse_stream(_request: Any, context: grpc.aio.ServicerContext[Any, Any]
                                ) -> AsyncIterator[Any]:
            await context.abort(grpc.StatusCode.UNAVAILABLE, message)
            yield  # pragma: no cover - abort raises

        streams_back = handler.unary_stream is not None or handler.stream_stream is not None
        return rewrap(handler, refuse_stream if streams_back else refuse)
