"""DeviceService: decode, call one service method, encode. No state here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from coordinator.rounds.service import (
    CheckInOutcome,
    CoordinatorService,
    Participation,
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
    def __init__(self, service: CoordinatorService, *, idle_timeout_s: float = 30.0) -> None:
        self._service = service
        self._idle_timeout_s = idle_timeout_s

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


def _update_header(msg: device_pb2.UpdateHeader) -> UpdateHeader:
    return UpdateHeader(
        participation=_participation(msg.participation),
        num_examples=msg.num_examples,
        tensors=convert.tensor_infos_from_proto(msg.tensors),
        total_bytes=msg.total_bytes,
        sha256=msg.sha256,
        metrics=dict(msg.metrics),
    )
