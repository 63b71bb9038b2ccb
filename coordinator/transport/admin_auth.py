"""Authentication and authorization of every AdminService call, in one interceptor: the
credentials come from the ``authorization`` metadata, the role each RPC needs from
:data:`coordinator.security.roles.REQUIRED_ROLE` (an RPC not listed is refused to all), and
refusals and audited actions go to the audit log. The servicer reads the caller from
:data:`current_principal`."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from coordinator.security.errors import SecurityError
from coordinator.security.roles import AUDITED, Principal
from coordinator.security.service import Security
from coordinator.transport.rewrap import rewrap
from coordinator.transport.status import Context, abort_for, status_for

_PREFIX = "/fedcoord.v1.AdminService/"

#: The principal of the admin call being served.
current_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def _target(request: Any, response: Any = None) -> str:
    for name in ("task_id", "device_id", "token_id"):
        value = getattr(request, name, "")
        if value:
            return str(value)
    for name in ("task", "token"):
        inner = getattr(response, name, None)
        for field in ("task_id", "token_id"):
            value = getattr(inner, field, "")
            if value:
                return str(value)
    return str(getattr(response, "token_id", ""))


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, security: Security) -> None:
        self._security = security

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(_PREFIX):
            return handler
        name = method[len(_PREFIX):]
        if handler.unary_unary is not None:  # the aio servicer's coroutine
            return rewrap(handler, self._unary(name, handler.unary_unary))
        if handler.unary_stream is not None:
            return rewrap(handler, self._unary_stream(name, handler.unary_stream))
        raise TypeError(f"admin RPC {name} has an unexpected shape")  # none exists

    async def _admit(self, name: str, context: Context) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        actor = "anonymous"
        try:
            principal = self._security.admin.authenticate(
                authorization if isinstance(authorization, str) else None)
            actor = principal.actor
            self._security.admin.authorize(principal, name)
        except SecurityError as exc:
            code = status_for(exc)
            self._security.audit.record(actor, name, "", code.name if code else "refused",
                                        str(exc))
            await abort_for(exc, context)
        current_principal.set(principal)
        return principal

    def _unary(self, name: str, inner: Callable[[Any, Context], Awaitable[Any]]
               ) -> Callable[[Any, Context], Awaitable[Any]]:
        async def call(request: Any, context: Context) -> Any:
            principal = await self._admit(name, context)
            try:
                response = await inner(request, context)
            except BaseException:
                self._audit_failure(principal, name, request, context)
                raise
            if name in AUDITED:
                self._security.audit.record(principal.actor, name,
                                            _target(request, response), "ok")
            return response

        return call

    def _unary_stream(self, name: str, inner: Callable[[Any, Context], AsyncIterator[Any]]
                      ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            principal = await self._admit(name, context)
            try:
                async for message in inner(request, context):
                    yield message
            except BaseException:
                self._audit_failure(principal, name, request, context)
                raise
            if name in AUDITED:
                self._security.audit.record(principal.actor, name, _target(request), "ok",
                                            f"version {getattr(request, 'version', 0) or 'latest'}")

        return call

    def _audit_failure(self, principal: Principal, name: str, request: Any,
                       context: Context) -> None:
        code = context.code() if hasattr(context, "code") else None
        outcome = code.name if isinstance(code, grpc.StatusCode) else "error"
        details = context.details() if hasattr(context, "details") else ""
        self._security.audit.record(principal.actor, name, _target(request), outcome,
                                    str(details or "")[:300])
