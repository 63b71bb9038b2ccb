"""DeviceService: decode, call one service method, encode. No state here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import NoneType
from typing import Any, Generic, TypeVar

from coordinator.rounds.errors import Unavailable
from coordinator.rounds.service import (
    CheckInOutcome,
    CoordinatorService,
    KeyAdvertisement,
    MaskedInputRequest,
    Participation,
    ShareKeysRequest,
    ShareKeysResponse,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    UpdateHeader,
)
from coordinator.security.errors import RateLimited
from coordinator.security.service import Security
from coordinator.transport.blobs import model_messages
from coordinator.transport.device_auth import abort_limited
from coordinator.transport.status import (
    Context,
    UploadStalled,
    abort_for,
    check_api_version,
    maps_errors,
    still_open,
)
from protos import convert
from protos.fedcoord.v1 import device_pb2, device_pb2_grpc

_OUTCOMES = {
    CheckInOutcome.ACCEPTED: device_pb2.CheckInResponse.ACCEPTED,
    CheckInOutcome.RETRY_LATER: device_pb2.CheckInResponse.RETRY_LATER,
    CheckInOutcome.NO_TASK: device_pb2.CheckInResponse.NO_TASK,
    CheckInOutcome.FINISHED: device_pb2.CheckInResponse.FINISHED,
}



class _GroupCommit:
    """Holds a device's answer until the participant writes its call made are in the
    database; the writes queued while one flush runs (off the event loop) share the next,
    so many devices' admissions and reports cost one commit."""

    def __init__(self, service: CoordinatorService) -> None:
        self._service = service
        self._flushing: asyncio.Future[None] | None = None
        service.defer_participant_writes()

    def queued(self) -> int:
        """The sequence number of the last participant write queued so far."""
        return self._service.participant_writes_queued()

    async def durable(self, seq: int | None = None) -> None:
        """Returns once every participant write queued up to ``seq`` (None: up to now)
        is in the database."""
        if seq is None:
            seq = self._service.participant_writes_queued()
        while not self._service.participant_writes_durable(seq):
            flushing = self._flushing
            if flushing is None or flushing.done():
                flushing = self._flushing = asyncio.ensure_future(
                    asyncio.to_thread(self._service.flush_participant_writes))
            await asyncio.shield(flushing)


def _participation(msg: device_pb2.Participation) -> Participation:
    return Participation(msg.device_id, msg.task_id, msg.round_number, msg.token)


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """Check-ins arrive authenticated, and every later call from an enrolled, unrevoked
    device (coordinator.transport.device_auth)."""

    def __init__(self, service: CoordinatorService, security: Security, *,
                 idle_timeout_s: float = 30.0, max_stage_wait_s: float = 24 * 3600.0) -> None:
        self._service = service
        self._security = security
        self._idle_timeout_s = idle_timeout_s
        self._max_stage_wait_s = max_stage_wait_s
        self._progress = asyncio.Event()
        self._written = _GroupCommit(service)
        service.add_progress_listener(self._wake_waiters)
        #: Bytes of update chunks received and model chunks sent (``/metrics``).
        self.bytes_received = 0
        self.bytes_sent = 0

    def _wake_waiters(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    async def _reply_after(self, p: Participation, stage: Stage) -> object:
        """Waits until ``stage`` closes and returns this device's next message. The service
        closes every stage by a deadline (driven by its tick), so the wait is bounded; the
        extra cap guards against a bug, not a normal path."""
        give_up = time.monotonic() + self._max_stage_wait_s
        while True:
            event = self._progress
            reply = self._service.secagg_reply(p, stage)
            if reply is not None:
                return reply
            if time.monotonic() > give_up:
                raise Unavailable(f"the {stage.name.lower()} stage did not close in time")
            try:
                await asyncio.wait_for(event.wait(), timeout=0.25)
            except TimeoutError:
                pass

    async def _next(
        self, messages: AsyncIterator[device_pb2.UploadUpdateRequest]
    ) -> device_pb2.UploadUpdateRequest | None:
        """The next message of a stream, or None at its end; a sender silent for longer than
        the idle timeout is cut off, so a stalled upload never holds a round open."""
        try:
            return await asyncio.wait_for(anext(messages, None), self._idle_timeout_s)
        except TimeoutError:
            raise UploadStalled(
                f"no upload data for {self._idle_timeout_s:.0f} s; the upload was dropped"
            ) from None

    @maps_errors
    async def Enroll(
        self, request: device_pb2.EnrollRequest, context: Context
    ) -> device_pb2.EnrollResponse:
        check_api_version(request.api_version)
        try:
            device_id = self._security.devices.enroll(
                convert.device_proof_from_proto(request.proof), request.enrollment_token,
                bytes(request.attestation), context.peer())
        except RateLimited as exc:
            await abort_limited(exc, context)
        return device_pb2.EnrollResponse(device_id=device_id)

    @maps_errors
    async def CheckIn(
        self, request: device_pb2.CheckInRequest, context: Context
    ) -> device_pb2.CheckInResponse:
        check_api_version(request.api_version)
        before = self._written.queued()
        result = self._service.check_in(
            request.device_id, convert.attributes_from_proto(request.attributes),
            request.task_id or None, schema=convert.check_in_schema_from_proto(request),
            declined=convert.declined_task_ids_from_proto(request.declined_task_ids),
            stratum=convert.check_in_stratum_from_proto(request),
        )
        # A seat is recorded before its device hears of it (its own admission, or one
        # queued by an earlier call of the same device). A "come back later" that queued
        # nothing promises nothing, and is answered without waiting for others' writes.
        if result.outcome is CheckInOutcome.ACCEPTED or self._written.queued() != before:
            await self._written.durable()
        return device_pb2.CheckInResponse(
            outcome=_OUTCOMES[result.outcome],
            task_id=result.task_id,
            round_number=result.round_number,
            participation_token=result.token,
            retry_after_ms=int(result.retry_after_s * 1000),
            message=result.message,
        )

    @maps_errors
    async def GetPlan(
        self, request: device_pb2.GetPlanRequest, context: Context
    ) -> device_pb2.GetPlanResponse:
        check_api_version(request.api_version)
        plan = self._service.get_plan(_participation(request.participation))
        spec_msg = convert.task_spec_to_proto_parts(plan.model, plan.local)
        return device_pb2.GetPlanResponse(
            task_id=plan.task_id,
            round_number=plan.round_number,
            model=spec_msg[0],
            model_version=plan.model_version,
            model_sha256=plan.model_sha256,
            model_size_bytes=plan.model_size_bytes,
            local=spec_msg[1],
            evaluate=plan.evaluate,
            deadline_unix_ms=int(plan.deadline * 1000),
            max_update_bytes=plan.max_update_bytes,
            max_chunk_bytes=plan.max_chunk_bytes,
            update_tensors=convert.tensor_infos_to_proto(plan.update_tensors),
            seed=plan.seed,
            secure_aggregation=(convert.secagg_plan_to_proto(plan.secure_aggregation)
                                if plan.secure_aggregation is not None else None),
            privacy=convert.plan_privacy_to_proto(plan.privacy),
            metrics=convert.metrics_policy_to_proto(plan.metrics),
            shard_upload=convert.shard_upload_to_proto(plan.shard_upload),
        )

    async def DownloadModel(
        self, request: device_pb2.DownloadModelRequest, context: Context
    ) -> AsyncIterator[device_pb2.DownloadModelResponse]:
        try:
            check_api_version(request.api_version)
            record = self._service.model_for_participant(
                _participation(request.participation), request.model_version
            )
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_for(exc, context)
        for message in model_messages(self._service, record, device_pb2.DownloadModelResponse):
            self.bytes_sent += len(message.chunk)
            yield message

    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[device_pb2.UploadUpdateRequest],
        context: Context,
    ) -> device_pb2.UploadUpdateResponse:
        """An update counts only once its stream ended well: the end of the stream seen,
        every byte and the hash checked (off the event loop), and the call still open."""
        upload = None
        messages = aiter(request_iterator)
        try:
            first = await self._next(messages)
            if first is None or not first.HasField("header"):
                raise convert.WireFormatError("an upload must start with an UpdateHeader message")
            check_api_version(first.header.api_version)
            upload = self._service.begin_upload(_update_header(first.header))
            if upload.takes_data:  # else a retry of an upload that was answered already
                while (msg := await self._next(messages)) is not None:
                    if msg.HasField("header"):
                        raise convert.WireFormatError("an upload has exactly one UpdateHeader")
                    upload.write(msg.chunk)
                    self.bytes_received += len(msg.chunk)
                await asyncio.to_thread(upload.verify)
                await still_open(context)
            answer = self._service.finish_upload(upload)
            await self._written.durable()
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_for(exc, context)
        finally:  # also when the call is cancelled: the upload never stays open
            if upload is not None:
                self._service.abort_upload(upload)
        return device_pb2.UploadUpdateResponse(accepted=True, message=answer)

    @maps_errors
    async def ReportStatus(
        self, request: device_pb2.ReportStatusRequest, context: Context
    ) -> device_pb2.ReportStatusResponse:
        check_api_version(request.api_version)
        self._service.report_status(
            _participation(request.participation), dict(request.metrics), request.error,
            decline=request.decline,
        )
        await self._written.durable()
        return device_pb2.ReportStatusResponse()


    # ---------------------------------------------------------------- secure aggregation
    # Each RPC is a row of the table at the end of this module (see _SecAggRpc).

    @maps_errors
    async def SecAggAdvertiseKeys(
        self, request: device_pb2.SecAggAdvertiseKeysRequest, context: Context
    ) -> device_pb2.SecAggShareKeysInstruction:
        return await self._secagg(_ADVERTISE_KEYS, request)

    @maps_errors
    async def SecAggShareKeys(
        self, request: device_pb2.SecAggShareKeysRequest, context: Context
    ) -> device_pb2.SecAggMaskInstruction:
        return await self._secagg(_SHARE_KEYS, request)

    @maps_errors
    async def SecAggMaskedInput(
        self, request: device_pb2.SecAggMaskedInputRequest, context: Context
    ) -> device_pb2.SecAggUnmaskInstruction:
        return await self._secagg(_MASKED_INPUT, request)

    @maps_errors
    async def SecAggUnmask(
        self, request: device_pb2.SecAggUnmaskRequest, context: Context
    ) -> device_pb2.SecAggUnmaskResponse:
        return await self._secagg(_UNMASK, request)

    async def _secagg(self, rpc: _SecAggRpc[M, R, T], request: Any) -> T:
        check_api_version(request.api_version)
        p = _participation(request.participation)
        rpc.deliver(self._service, p, rpc.decode(self._service, p, request))
        await self._written.durable()
        reply = None if rpc.after is None else await self._reply_after(p, rpc.after)
        if not isinstance(reply, rpc.reply):  # a bug in the service, reported as INTERNAL
            raise TypeError(f"expected a {rpc.reply.__name__} after {rpc.after!r}, got a "
                            f"{type(reply).__name__}")
        return rpc.encode(reply)


M = TypeVar("M")  # the domain message a request decodes to
R = TypeVar("R")  # what the service hands back once the awaited stage closes
T = TypeVar("T")  # the response message


@dataclass(frozen=True)
class _SecAggRpc(Generic[M, R, T]):
    """One secure-aggregation RPC: ``decode`` turns the request into a domain message that
    ``deliver`` hands to one service method; unless ``after`` is None the device then waits
    until that stage closes, and its next message, a ``reply``, is encoded as the
    ``response``. M, R and T are inferred per row, so mypy checks that decode makes what
    deliver takes and that the RPC returns its declared response."""

    decode: Callable[[CoordinatorService, Participation, Any], M]
    deliver: Callable[[CoordinatorService, Participation, M], None]
    after: Stage | None
    reply: type[R]
    response: type[T]
    encode: Callable[[R], T]


# ------------------------------------------------------------------ the table, one row per RPC

_ADVERTISE_KEYS = _SecAggRpc(
    decode=lambda s, p, r: KeyAdvertisement(
        bytes(r.encryption_public_key), bytes(r.mask_public_key), bytes(r.config_hash)),
    deliver=lambda s, p, m: s.secagg_advertise(p, m),
    after=Stage.ADVERTISE,
    reply=ShareKeysRequest,
    response=device_pb2.SecAggShareKeysInstruction,
    encode=convert.share_keys_instruction_to_proto,
)
_SHARE_KEYS = _SecAggRpc(
    decode=lambda s, p, r: ShareKeysResponse(convert.ciphertexts_from_proto(r.ciphertexts)),
    deliver=lambda s, p, m: s.secagg_share_keys(p, m),
    after=Stage.SHARE_KEYS,
    reply=MaskedInputRequest,
    response=device_pb2.SecAggMaskInstruction,
    encode=lambda m: device_pb2.SecAggMaskInstruction(
        ciphertexts=convert.ciphertexts_to_proto(m.ciphertexts)),
)
_MASKED_INPUT = _SecAggRpc(
    # The message is the argument list of secagg_masked_input after the participation.
    decode=lambda s, p, r: (
        convert.ring_vector_from_bytes(r.masked_input, s.secagg_plan(p).params.ring_bits),
        dict(r.metrics),
        r.clipped_values,
    ),
    deliver=lambda s, p, m: s.secagg_masked_input(p, *m),
    after=Stage.MASKED_INPUT,
    reply=UnmaskRequest,
    response=device_pb2.SecAggUnmaskInstruction,
    encode=convert.unmask_instruction_to_proto,
)
_UNMASK = _SecAggRpc(
    decode=lambda s, p, r: UnmaskResponse(
        convert.shares_from_proto(r.seed_shares), convert.shares_from_proto(r.key_shares)),
    deliver=lambda s, p, m: s.secagg_unmask(p, m),
    after=None,  # the last stage: nothing to wait for, the shares are acknowledged at once
    reply=NoneType,
    response=device_pb2.SecAggUnmaskResponse,
    encode=lambda _: device_pb2.SecAggUnmaskResponse(message="shares accepted"),
)


def _update_header(msg: device_pb2.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        participation=_participation(msg.participation),
        num_examples=msg.num_examples,
        tensors=convert.tensor_infos_from_proto(msg.tensors),
        total_bytes=msg.total_bytes,
        sha256=msg.sha256,
        metrics=dict(msg.metrics),
        upload_id=msg.upload_id,
        ticket=convert.ticket_from_proto(msg.ticket),
    )
