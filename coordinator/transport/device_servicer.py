"""DeviceService: decode, call one service method, encode. No state here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

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
from coordinator.transport.blobs import model_messages
from coordinator.transport.status import (
    Context,
    UploadStalled,
    abort_for,
    check_api_version,
    maps_errors,
)
from protos import convert
from protos.fedcoord.v1 import device_pb2, device_pb2_grpc

_OUTCOMES = {
    CheckInOutcome.ACCEPTED: device_pb2.CheckInResponse.ACCEPTED,
    CheckInOutcome.RETRY_LATER: device_pb2.CheckInResponse.RETRY_LATER,
    CheckInOutcome.NO_TASK: device_pb2.CheckInResponse.NO_TASK,
    CheckInOutcome.FINISHED: device_pb2.CheckInResponse.FINISHED,
}



def _participation(msg: device_pb2.Participation) -> Participation:
    return Participation(msg.device_id, msg.task_id, msg.round_number, msg.token)


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    def __init__(self, service: CoordinatorService, *, idle_timeout_s: float = 30.0,
                 max_stage_wait_s: float = 24 * 3600.0) -> None:
        self._service = service
        self._idle_timeout_s = idle_timeout_s
        self._max_stage_wait_s = max_stage_wait_s
        self._progress = asyncio.Event()
        service.add_progress_listener(self._wake_waiters)

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
    async def CheckIn(
        self, request: device_pb2.CheckInRequest, context: Context
    ) -> device_pb2.CheckInResponse:
        check_api_version(request.api_version)
        result = self._service.check_in(
            request.device_id, convert.attributes_from_proto(request.attributes),
            request.task_id or None,
        )
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
            yield message

    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[device_pb2.UploadUpdateRequest],
        context: Context,
    ) -> device_pb2.UploadUpdateResponse:
        upload = None
        messages = aiter(request_iterator)
        try:
            first = await self._next(messages)
            if first is None or not first.HasField("header"):
                raise convert.WireFormatError("an upload must start with an UpdateHeader message")
            check_api_version(first.header.api_version)
            upload = self._service.begin_upload(_update_header(first.header))
            while (msg := await self._next(messages)) is not None:
                if msg.HasField("header"):
                    raise convert.WireFormatError("an upload has exactly one UpdateHeader")
                upload.write(msg.chunk)
            pending, upload = upload, None
            self._service.finish_upload(pending)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            if upload is not None:
                self._service.abort_upload(upload)
            await abort_for(exc, context)
        return device_pb2.UploadUpdateResponse(accepted=True, message="update accepted")

    @maps_errors
    async def ReportStatus(
        self, request: device_pb2.ReportStatusRequest, context: Context
    ) -> device_pb2.ReportStatusResponse:
        check_api_version(request.api_version)
        self._service.report_status(
            _participation(request.participation), dict(request.metrics), request.error
        )
        return device_pb2.ReportStatusResponse()


    # ---------------------------------------------------------------- secure aggregation

    @maps_errors
    async def SecAggAdvertiseKeys(
        self, request: device_pb2.SecAggAdvertiseKeysRequest, context: Context
    ) -> device_pb2.SecAggShareKeysInstruction:
        check_api_version(request.api_version)
        p = _participation(request.participation)
        self._service.secagg_advertise(p, KeyAdvertisement(
            bytes(request.encryption_public_key), bytes(request.mask_public_key),
            bytes(request.config_hash)))
        reply = await self._reply_after(p, Stage.ADVERTISE)
        assert isinstance(reply, ShareKeysRequest)
        out: device_pb2.SecAggShareKeysInstruction = convert.share_keys_instruction_to_proto(reply)
        return out

    @maps_errors
    async def SecAggShareKeys(
        self, request: device_pb2.SecAggShareKeysRequest, context: Context
    ) -> device_pb2.SecAggMaskInstruction:
        check_api_version(request.api_version)
        p = _participation(request.participation)
        self._service.secagg_share_keys(p, ShareKeysResponse(
            convert.ciphertexts_from_proto(request.ciphertexts)))
        reply = await self._reply_after(p, Stage.SHARE_KEYS)
        assert isinstance(reply, MaskedInputRequest)
        return device_pb2.SecAggMaskInstruction(
            ciphertexts=convert.ciphertexts_to_proto(reply.ciphertexts))

    @maps_errors
    async def SecAggMaskedInput(
        self, request: device_pb2.SecAggMaskedInputRequest, context: Context
    ) -> device_pb2.SecAggUnmaskInstruction:
        check_api_version(request.api_version)
        p = _participation(request.participation)
        plan = self._service.secagg_plan(p)
        vector = convert.ring_vector_from_bytes(request.masked_input, plan.params.ring_bits)
        self._service.secagg_masked_input(p, vector, dict(request.metrics),
                                          request.clipped_values)
        reply = await self._reply_after(p, Stage.MASKED_INPUT)
        assert isinstance(reply, UnmaskRequest)
        out: device_pb2.SecAggUnmaskInstruction = convert.unmask_instruction_to_proto(reply)
        return out

    @maps_errors
    async def SecAggUnmask(
        self, request: device_pb2.SecAggUnmaskRequest, context: Context
    ) -> device_pb2.SecAggUnmaskResponse:
        check_api_version(request.api_version)
        p = _participation(request.participation)
        self._service.secagg_unmask(p, UnmaskResponse(
            convert.shares_from_proto(request.seed_shares),
            convert.shares_from_proto(request.key_shares)))
        return device_pb2.SecAggUnmaskResponse(message="shares accepted")


def _update_header(msg: device_pb2.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        participation=_participation(msg.participation),
        num_examples=msg.num_examples,
        tensors=convert.tensor_infos_from_proto(msg.tensors),
        total_bytes=msg.total_bytes,
        sha256=msg.sha256,
        metrics=dict(msg.metrics),
    )
