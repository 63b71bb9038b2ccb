"""AdminService: decode, call one service method, encode. No state here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from coordinator.observability.store_sink import StoreSink
from coordinator.rounds.errors import InvalidRequest, Unavailable
from coordinator.rounds.service import CoordinatorService, TaskView
from coordinator.security.roles import Role
from coordinator.security.service import Security
from coordinator.storage import ApiTokenRecord, DeviceRecord
from coordinator.storage.records import RoundRecord
from coordinator.transport.admin_auth import current_principal
from coordinator.transport.blobs import model_messages
from coordinator.transport.event_convert import event_to_proto
from coordinator.transport.status import Context, abort_for, check_api_version, maps_errors
from protos import convert
from protos.fedcoord.v1 import admin_pb2, admin_pb2_grpc

T = TypeVar("T")

#: The most events one ListEvents answer holds (and its default).
EVENTS_PER_CALL = 1000


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
    msg.declines_by_reason.update(view.declines)
    if view.privacy is not None:
        msg.privacy.CopyFrom(convert.privacy_status_to_proto(view.privacy))
    return msg


def _api_token_to_proto(t: ApiTokenRecord) -> admin_pb2.ApiToken:
    return admin_pb2.ApiToken(token_id=t.token_id, role=t.role, label=t.label,
                              created_unix_ms=_ms(t.created_at),
                              expires_unix_ms=_ms(t.expires_at), revoked=t.revoked_at is not None)


def _device_to_proto(d: DeviceRecord) -> admin_pb2.Device:
    return admin_pb2.Device(device_id=d.device_id, public_key=d.public_key,
                            enrolled_unix_ms=_ms(d.enrolled_at), revoked_unix_ms=_ms(d.revoked_at),
                            enrollment_token_id=d.enrollment_token_id)


def _invalid(call: Callable[[], T]) -> T:
    """ValueError of the security layer's checks as INVALID_ARGUMENT."""
    try:
        return call()
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Every call reaches here authenticated and authorized (see admin_auth)."""

    def __init__(self, service: CoordinatorService, security: Security,
                 events: StoreSink | None = None) -> None:
        """``events``: where ListEvents reads (None: it answers UNAVAILABLE)."""
        self._service = service
        self._security = security
        self._events = events

    @maps_errors
    async def CreateTask(
        self, request: admin_pb2.CreateTaskRequest, context: Context
    ) -> admin_pb2.CreateTaskResponse:
        check_api_version(request.api_version)
        # The model is built, checked and written off the event loop: at 100M parameters
        # that takes seconds, which every other call would wait out.
        launch = self._service.launch_task(convert.task_spec_from_proto(request.spec))
        built = await asyncio.to_thread(self._service.build_task, launch)
        view = self._service.register_task(built)
        return admin_pb2.CreateTaskResponse(task=task_to_proto(view),
                                            launch_checks=view.launch_checks)

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
            task=task_to_proto(self._service.cancel_task(request.task_id, request.reason))
        )

    @maps_errors
    async def ListEvents(
        self, request: admin_pb2.ListEventsRequest, context: Context
    ) -> admin_pb2.ListEventsResponse:
        check_api_version(request.api_version)
        if self._events is None:
            raise Unavailable("this coordinator keeps no events")
        # The state first: every event emitted before it was read is in the answer.
        state = self._service.get_task(request.task_id).record.state
        events = self._events.list_events(request.task_id, request.after_seq,
                                          min(request.limit or EVENTS_PER_CALL, EVENTS_PER_CALL))
        return admin_pb2.ListEventsResponse(events=[event_to_proto(e) for e in events],
                                            task_state=state.value, task_final=state.is_final)

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

    # ---------------------------------------------------------------- tokens, devices, audit

    @maps_errors
    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Context
    ) -> admin_pb2.CreateTokenResponse:
        check_api_version(request.api_version)
        record, secret = _invalid(lambda: self._security.admin.create_token(
            Role.parse(request.role), request.label, request.expires_in_s))
        return admin_pb2.CreateTokenResponse(token=_api_token_to_proto(record), secret=secret)

    @maps_errors
    async def ListTokens(
        self, request: admin_pb2.ListTokensRequest, context: Context
    ) -> admin_pb2.ListTokensResponse:
        check_api_version(request.api_version)
        return admin_pb2.ListTokensResponse(
            tokens=[_api_token_to_proto(t) for t in self._security.admin.list_tokens()])

    @maps_errors
    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Context
    ) -> admin_pb2.RevokeTokenResponse:
        check_api_version(request.api_version)
        record = self._security.admin.revoke_token(request.token_id)
        return admin_pb2.RevokeTokenResponse(token=_api_token_to_proto(record))

    @maps_errors
    async def CreateEnrollmentToken(
        self, request: admin_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> admin_pb2.CreateEnrollmentTokenResponse:
        check_api_version(request.api_version)
        record, secret = _invalid(lambda: self._security.admin.create_enrollment_token(
            request.max_devices, request.expires_in_s, request.label))
        return admin_pb2.CreateEnrollmentTokenResponse(
            token_id=record.token_id, secret=secret, max_devices=record.max_devices,
            expires_unix_ms=_ms(record.expires_at))

    @maps_errors
    async def ListDevices(
        self, request: admin_pb2.ListDevicesRequest, context: Context
    ) -> admin_pb2.ListDevicesResponse:
        check_api_version(request.api_version)
        return admin_pb2.ListDevicesResponse(
            devices=[_device_to_proto(d) for d in self._security.devices.list_devices()])

    @maps_errors
    async def RevokeDevice(
        self, request: admin_pb2.RevokeDeviceRequest, context: Context
    ) -> admin_pb2.RevokeDeviceResponse:
        check_api_version(request.api_version)
        return admin_pb2.RevokeDeviceResponse(
            device=_device_to_proto(self._security.devices.revoke(request.device_id)))

    @maps_errors
    async def ListAudit(
        self, request: admin_pb2.ListAuditRequest, context: Context
    ) -> admin_pb2.ListAuditResponse:
        check_api_version(request.api_version)
        entries = self._security.audit.entries(request.limit or 100)
        return admin_pb2.ListAuditResponse(entries=[
            admin_pb2.AuditEntry(entry_id=e.entry_id, at_unix_ms=_ms(e.at), actor=e.actor,
                                 action=e.action, target=e.target, outcome=e.outcome,
                                 detail=e.detail)
            for e in entries])

    @maps_errors
    async def WhoAmI(
        self, request: admin_pb2.WhoAmIRequest, context: Context
    ) -> admin_pb2.WhoAmIResponse:
        check_api_version(request.api_version)
        principal = current_principal.get()
        return admin_pb2.WhoAmIResponse(actor=principal.actor, role=principal.role.label)
