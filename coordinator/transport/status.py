"""The one mapping from domain errors to gRPC status codes.

Every status message is at most :data:`MAX_DETAILS_CHARS` characters: no client input is
echoed unbounded (the messages that show it cut it short already).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc

from coordinator.rounds import errors as e
from coordinator.rounds.secure import Aborted
from coordinator.security import errors as security_errors
from coordinator.storage import errors as storage_errors
from core.types import API_VERSION
from protos.convert import WireFormatError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    e.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    WireFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.NotSelected: grpc.StatusCode.PERMISSION_DENIED,
    e.Duplicate: grpc.StatusCode.ALREADY_EXISTS,
    e.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Aborted: grpc.StatusCode.ABORTED,
    e.Late: grpc.StatusCode.FAILED_PRECONDITION,
    e.DataMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    e.Unavailable: grpc.StatusCode.UNAVAILABLE,
    storage_errors.NotFound: grpc.StatusCode.NOT_FOUND,
    storage_errors.Conflict: grpc.StatusCode.ABORTED,
    storage_errors.StorageError: grpc.StatusCode.UNAVAILABLE,
}


class ApiVersionMismatch(Exception):
    """The peer speaks another version of the wire API."""


class UploadStalled(Exception):
    """A client stopped sending in the middle of a stream."""


class CallEnded(Exception):
    """The call ended (cancelled, deadline, a transport error) before its work was done."""


class MessageTooLarge(Exception):
    """A request message is over its method's size limit (refused before it was parsed)."""


class MalformedMessage(Exception):
    """A request message is not valid protobuf for its method."""


_CODES[ApiVersionMismatch] = grpc.StatusCode.FAILED_PRECONDITION
_CODES[UploadStalled] = grpc.StatusCode.DEADLINE_EXCEEDED
_CODES[CallEnded] = grpc.StatusCode.CANCELLED
_CODES[MessageTooLarge] = grpc.StatusCode.RESOURCE_EXHAUSTED
_CODES[MalformedMessage] = grpc.StatusCode.INVALID_ARGUMENT

#: Longest status message sent: a backstop, since messages that show client input cut it
#: short already (:func:`coordinator.rounds.errors.shown`).
MAX_DETAILS_CHARS = 1000
_CODES[security_errors.Unauthenticated] = grpc.StatusCode.UNAUTHENTICATED
_CODES[security_errors.PermissionDenied] = grpc.StatusCode.PERMISSION_DENIED
_CODES[security_errors.RateLimited] = grpc.StatusCode.RESOURCE_EXHAUSTED


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return None


def check_api_version(version: int) -> None:
    if version != API_VERSION:
        raise ApiVersionMismatch(
            f"client speaks fedcoord API v{version}, this coordinator speaks v{API_VERSION}; "
            "upgrade the client"
        )


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def maps_errors(method: F) -> F:
    """Turns domain errors raised by a unary servicer method into gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL below
            await abort_for(exc, context)

    return wrapper  # type: ignore[return-value]


async def abort_for(exc: Exception, context: Context) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code = status_for(exc)
    if code is None:
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    await context.abort(code, bounded_details(str(exc)))
    raise AssertionError("unreachable")  # context.abort always raises


def bounded_details(message: str) -> str:
    """``message`` cut to :data:`MAX_DETAILS_CHARS`, saying so."""
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[:MAX_DETAILS_CHARS - 30] + f"... ({len(message)} characters)"


async def still_open(context: Context) -> None:
    """Raises CallEnded unless the call is still open. gRPC ends a client stream the same
    way when the client half-closes it, cancels the call, runs out of time or sends a
    message over gRPC's limit; only an operation on the call tells them apart (outside
    testing, issue 13: such uploads were counted, and their retries were duplicates)."""
    try:
        await context.send_initial_metadata(())
    except Exception:  # noqa: BLE001 - gRPC's own error type for a finished call
        raise CallEnded("the call ended before the upload did (cancelled, out of time, or "
                        "a message over the size limit); it was not counted") from None
