"""AggregatorService (an aggregator shard, ``fedctl aggregator serve``): decode, call one
:class:`~coordinator.aggregator_shard.ShardState` method, encode. No state here.

Devices call UploadUpdate, streamed as DeviceService.UploadUpdate is: an update counts only
once its stream ended well (the end seen, size and hash checked off the event loop, the
call still open) and it was added to the round's sum (off the event loop too). The
coordinator's calls (RoundProgress, CollectRound, DropRound) carry its admin token
(:data:`core.shards.ADMIN_METADATA`); without it they are answered UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np

from coordinator.aggregator_shard import ShardState
from coordinator.security.errors import Unauthenticated
from coordinator.transport.handlers import UNARY_BYTES, register_service
from coordinator.transport.status import (
    Context,
    UploadStalled,
    abort_for,
    check_api_version,
    maps_errors,
    still_open,
)
from core.shards import ADMIN_METADATA, check_admin_token
from protos import convert
from protos.fedcoord.v1 import aggregator_pb2, aggregator_pb2_grpc, device_pb2

#: Bytes of a collected sum per message when the coordinator asks for no size.
COLLECT_CHUNK_BYTES = 1 << 20

_SERVICE = aggregator_pb2.DESCRIPTOR.services_by_name["AggregatorService"]


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServiceServicer):
    """``key``: the shard key, which the coordinator's admin token is checked against.
    ``max_message_bytes``: the largest message sent (a collected sum's chunks are cut to
    fit)."""

    def __init__(self, state: ShardState, key: bytes, *, idle_timeout_s: float = 30.0,
                 max_message_bytes: int = 4 << 20) -> None:
        self._state = state
        self._key = key
        self._idle_timeout_s = idle_timeout_s
        # A chunk message is the bytes plus a few of framing; float64 values stay whole.
        self._max_chunk = max(8, (max_message_bytes - 64) // 8 * 8)

    async def UploadUpdate(
        self, request_iterator: AsyncIterator[device_pb2.UploadUpdateRequest],
        context: Context,
    ) -> device_pb2.UploadUpdateResponse:
        upload = None
        messages = aiter(request_iterator)
        try:
            first = await self._next(messages)
            if first is None or not first.HasField("header"):
                raise convert.WireFormatError("an upload must start with an UpdateHeader message")
            check_api_version(first.header.api_version)
            upload = self._state.begin_upload(convert.update_header_from_proto(first.header))
            if upload.takes_data:  # else a retry of an upload that was answered already
                while (msg := await self._next(messages)) is not None:
                    if msg.HasField("header"):
                        raise convert.WireFormatError("an upload has exactly one UpdateHeader")
                    upload.write(msg.chunk)
                await asyncio.to_thread(upload.verify)
                await still_open(context)
            answer = await asyncio.to_thread(self._state.finish_upload, upload)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_for(exc, context)
        finally:  # also when the call is cancelled: the upload never stays open
            if upload is not None:
                self._state.abort_upload(upload)
        return device_pb2.UploadUpdateResponse(accepted=True, message=answer)

    @maps_errors
    async def RoundProgress(self, request: aggregator_pb2.RoundProgressRequest,
                            context: Context) -> aggregator_pb2.RoundProgressResponse:
        self._authorize(context)
        keys = [convert.round_key_from_proto(r) for r in request.rounds]
        return aggregator_pb2.RoundProgressResponse(rounds=[
            aggregator_pb2.ShardRoundProgress(round=convert.round_key_to_proto(p.key),
                                              reported=p.reported, collected=p.collected)
            for p in self._state.progress(keys)])

    async def CollectRound(self, request: aggregator_pb2.CollectRoundRequest,
                           context: Context) -> AsyncIterator[aggregator_pb2.CollectRoundResponse]:
        try:
            self._authorize(context)
            key = convert.round_key_from_proto(request.round)
            part = await asyncio.to_thread(self._state.collect, key)  # waits for folds
            header = await asyncio.to_thread(convert.partial_sum_header_to_proto, key, part)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_for(exc, context)
        yield aggregator_pb2.CollectRoundResponse(header=header)
        size = min(request.max_chunk_bytes or COLLECT_CHUNK_BYTES, self._max_chunk)
        values = max(1, size // 8)
        total = np.ascontiguousarray(part.total, dtype="<f8")
        for start in range(0, total.size, values):
            yield aggregator_pb2.CollectRoundResponse(
                chunk=total[start:start + values].tobytes())

    @maps_errors
    async def DropRound(self, request: aggregator_pb2.DropRoundRequest,
                        context: Context) -> aggregator_pb2.DropRoundResponse:
        self._authorize(context)
        self._state.drop(convert.round_key_from_proto(request.round))
        return aggregator_pb2.DropRoundResponse()

    def _authorize(self, context: Context) -> None:
        """Raises Unauthenticated unless the call carries the coordinator's admin token."""
        presented = ""
        for name, value in context.invocation_metadata() or ():
            if name == ADMIN_METADATA and isinstance(value, str):
                presented = value
        try:
            ok = bool(presented) and check_admin_token(self._key, presented)
        except TypeError:  # not ASCII: no token of ours
            ok = False
        if not ok:
            raise Unauthenticated(f"this call is the coordinator's: it needs the {ADMIN_METADATA} "
                                  "metadata of the key this shard was started with")

    async def _next(self, messages: AsyncIterator[device_pb2.UploadUpdateRequest]
                    ) -> device_pb2.UploadUpdateRequest | None:
        """The next message, or None at the end; a sender silent for longer than the idle
        timeout is cut off."""
        try:
            return await asyncio.wait_for(anext(messages, None), self._idle_timeout_s)
        except TimeoutError:
            raise UploadStalled(
                f"no upload data for {self._idle_timeout_s:.0f} s; the upload was dropped"
            ) from None


class ShardRequestLimits:
    """A shard's per-method request limits (:class:`coordinator.transport.handlers.Limits`):
    UploadUpdate messages up to ``upload_message_bytes``, the others
    :data:`~coordinator.transport.handlers.UNARY_BYTES`."""

    def __init__(self, upload_message_bytes: int) -> None:
        self._upload_message_bytes = upload_message_bytes

    def of(self, service_name: str, method: str) -> Callable[[], int]:
        limit = (self._upload_message_bytes if (service_name, method) ==
                 ("AggregatorService", "UploadUpdate") else UNARY_BYTES)
        return lambda: limit


def add_aggregator_servicer(servicer: AggregatorServicer, server: grpc.aio.Server, *,
                            upload_message_bytes: int) -> None:
    """Registers ``servicer`` with per-method request limits, checked before parsing."""
    register_service(servicer, server, _SERVICE, ShardRequestLimits(upload_message_bytes))
