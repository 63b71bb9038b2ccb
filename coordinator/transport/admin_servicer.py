"""AdminService: decode, call one service method, encode. No state here."""

from __future__ import annotations

from collections.abc import AsyncIterator

from coordinator.rounds.service import CoordinatorService, TaskView
from coordinator.storage.records import RoundRecord
from coordinator.transport.blobs import model_messages
from coordinator.transport.status import Context, abort_for, check_api_version, maps_errors
from protos import convert
from protos.fedcoord.v1 import admin_pb2, admin_pb2_grpc


def _ms(seconds: float | None) -> int:
    return int(seconds * 1000) if seconds else 0


def round_to_proto(r: RoundRecord) -> admin_pb2.Round:
    return admin_pb2.Round(
        round_number=r.round_number,
        attempt=r.attempt,
        state=r.state.value,
        selected=r.selected,
        reports=r.reports,
        goal=r.goal,
        started_unix_ms=_ms(r.started_at),
        deadline_unix_ms=_ms(r.deadline),
        ended_unix_ms=_ms(r.ended_at),
        failure_reason=r.failure_reason,
        model_version=r.model_version or 0,
        metrics=dict(r.metrics),
    )


def task_to_proto(view: TaskView) -> admin_pb2.Task:
    rec = view.record
    msg = admin_pb2.Task(
        task_id=rec.task_id,
        spec=convert.task_spec_to_proto(view.spec),
        state=rec.state.value,
        rounds_committed=rec.rounds_committed,
        model_version=rec.model_version,
        reason=rec.reason,
        created_unix_ms=_ms(rec.created_at),
    )
    if view.current_round is not None:
        msg.current_round.CopyFrom(round_to_proto(view.current_round))
    msg.metrics_release = view.metrics.value
    if view.privacy is not None:
        msg.privacy.CopyFrom(convert.privacy_status_to_proto(view.privacy))
    return msg


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, service: CoordinatorService) -> None:
        self._service = service

    @maps_errors
    async def CreateTask(
        self, request: admin_pb2.CreateTaskRequest, context: Context
    ) -> admin_pb2.CreateTaskResponse:
        check_api_version(request.api_version)
        view = self._service.create_task(convert.task_spec_from_proto(request.spec))
        return admin_pb2.CreateTaskResponse(task=task_to_proto(view))

    @maps_errors
    async def GetTask(
        self, request: admin_pb2.GetTaskRequest, context: Context
    ) -> admin_pb2.GetTaskResponse:
        check_api_version(request.api_version)
        return admin_pb2.GetTaskResponse(task=task_to_proto(self._service.get_task(request.task_id)))

    @maps_errors
    async def ListTasks(
        self, request: admin_pb2.ListTasksRequest, context: Context
    ) -> admin_pb2.ListTasksResponse:
        check_api_version(request.api_version)
        return admin_pb2.ListTasksResponse(
            tasks=[task_to_proto(v) for v in self._service.list_tasks()]
        )

    @maps_errors
    async def ListRounds(
        self, request: admin_pb2.ListRoundsRequest, context: Context
    ) -> admin_pb2.ListRoundsResponse:
        check_api_version(request.api_version)
        rounds = self._service.list_rounds(request.task_id)
        return admin_pb2.ListRoundsResponse(rounds=[round_to_proto(r) for r in rounds])

    @maps_errors
    async def CancelTask(
        self, request: admin_pb2.CancelTaskRequest, context: Context
    ) -> admin_pb2.CancelTaskResponse:
        check_api_version(request.api_version)
        return admin_pb2.CancelTaskResponse(
            task=task_to_proto(self._service.cancel_task(request.task_id))
        )

    async def DownloadModel(
        self, request: admin_pb2.AdminDownloadModelRequest, context: Context
    ) -> AsyncIterator[admin_pb2.AdminDownloadModelResponse]:
        try:
            check_api_version(request.api_version)
            record = self._service.model_version(request.task_id, request.version or None)
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await abort_for(exc, context)
        for message in model_messages(self._service, record, admin_pb2.AdminDownloadModelResponse):
            yield message
