"""The device side of the security layer, in one interceptor in front of DeviceService:

- ``CheckIn`` must carry a valid, fresh, unreplayed proof of an enrolled, unrevoked key whose
  derived id is the request's ``device_id``, within the per-address and per-device rates;
- every later call of a round names its participation; its device must still be enrolled
  and not revoked (a revocation takes effect at the device's next request), and the
  participation token it carries (issued only to an authenticated check-in, for one round)
  is checked by the round service;
- uploads and downloads hold one of their address's concurrent stream slots.

``Enroll`` is not gated here: the servicer hands it to the device gate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from coordinator.security.errors import RateLimited, Unauthenticated
from coordinator.security.service import Security
from coordinator.transport.handlers import Refused
from coordinator.transport.rewrap import rewrap
from coordinator.transport.status import Context, abort_for, check_api_version
from protos import convert

_PREFIX = "/fedcoord.v1.DeviceService/"
_UNGATED = frozenset({"Enroll"})


async def abort_limited(exc: Exception, context: Context) -> NoReturn:
    """Aborts with the status of ``exc``; a rate limit also says when to retry, in the
    trailing metadata ``retry-after-ms``."""
    if isinstance(exc, RateLimited):
        context.set_trailing_metadata((("retry-after-ms", str(int(exc.retry_after_s * 1000))),))
    await abort_for(exc, context)


class DeviceAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, security: Security) -> None:
        self._security = security

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if (handler is None or not method.startswith(_PREFIX)
                or not self._security.settings.authenticate_devices):
            return handler
        name = method[len(_PREFIX):]
        if name in _UNGATED:
            return handler
        if handler.unary_unary is not None:
            gate = self._check_in if name == "CheckIn" else self._participant
            return rewrap(handler, self._unary(gate, handler.unary_unary))
        if handler.unary_stream is not None:
            return rewrap(handler, self._download(handler.unary_stream))
        if handler.stream_unary is not None:
            return rewrap(handler, self._upload(handler.stream_unary))
        raise TypeError(f"device RPC {name} has an unexpected shape")  # none exists

    # -- gates ------------------------------------------------------------------------------

    def _check_in(self, request: Any, context: Context) -> None:
        if not request.HasField("proof"):
            raise Unauthenticated("a check-in must carry a DeviceProof signed with the "
                                  "device's key (enroll first)")
        request.device_id = self._security.devices.authenticate_check_in(
            convert.device_proof_from_proto(request.proof), request.device_id,
            request.task_id, context.peer())

    def _participant(self, request: Any, context: Context) -> None:
        participation = getattr(request, "participation", None)
        if participation is None:  # every device RPC but Enroll and CheckIn names one
            raise TypeError(f"{type(request).__name__} names no participation")
        self._security.devices.require_active(participation.device_id)

    # -- wrappers -----------------------------------------------------------------------------

    def _unary(self, gate: Callable[[Any, Context], None],
               inner: Callable[[Any, Context], Awaitable[Any]]
               ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            try:
                if not isinstance(request, Refused):  # else the handler says why
                    check_api_version(request.api_version)  # an old agent: "upgrade"
                    gate(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await abort_limited(exc, context)
            return await inner(request, context)

        return call

    def _download(self, inner: Callable[[Any, Context], AsyncIterator[Any]]
                  ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                if not isinstance(request, Refused):  # else the handler says why
                    check_api_version(request.api_version)
                    self._participant(request, context)
                slot = self._security.devices.stream(context.peer())
                slot.__enter__()
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await abort_limited(exc, context)
            try:
                async for message in inner(request, context):
                    yield message
            finally:
                slot.__exit__(None, None, None)

        return call

    def _upload(self, inner: Callable[[AsyncIterator[Any], Context], Awaitable[Any]]
                ) -> Callable[[AsyncIterator[Any], Context], Awaitable[Any]]:
        security = self._security

        async def call(requests: AsyncIterator[Any], context: Context) -> Any:
            try:
                slot = security.devices.stream(context.peer())
                slot.__enter__()
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await abort_limited(exc, context)
            try:
                return await inner(_headers_checked(requests, security), context)
            finally:
                slot.__exit__(None, None, None)

        return call


async def _headers_checked(requests: AsyncIterator[Any], security: Security
                           ) -> AsyncIterator[Any]:
    """The upload's messages, its header's device checked before the header is passed on
    (a refusal raises inside the servicer's read, which maps it to a status)."""
    async for message in requests:
        if not isinstance(message, Refused) and message.HasField("header"):
            check_api_version(message.header.api_version)
            security.devices.require_active(message.header.participation.device_id)
        yield message
