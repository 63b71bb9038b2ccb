"""Admin client for engineers' tools: plain values in, protobuf hidden."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc

from core.tls import ClientTls
from core.types import API_VERSION, TaskSpec
from fedctl.errors import CliError, cannot_reach
from protos import convert
from protos.fedcoord.v1 import admin_pb2, admin_pb2_grpc, events_pb2


class AdminError(Exception):
    """A coordinator answered with an error status, or could not be reached (``code``
    ``UNAVAILABLE``; see :attr:`unreachable`)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    @property
    def unreachable(self) -> bool:
        return self.code == "UNAVAILABLE"


#: Words of gRPC's own UNAVAILABLE details when no coordinator answered (connection refused,
#: DNS, a TLS handshake, a reset): the coordinator's own UNAVAILABLE messages carry none.
_TRANSPORT_MARKERS = ("connect", "resolv", "dns", "socket", "handshake", "ssl", "tls",
                      "reset", "closed", "backends", "recvmsg", "sendmsg", "goaway", "eof",
                      "broken pipe", "address")


#: What a standby replica's refusal says (coordinator.app: the replica's standby reason).
STANDBY_REFUSAL = "this coordinator is a standby replica"
#: Words of gRPC's UNAVAILABLE when no connection was made at all (nothing was sent).
_NEVER_CONNECTED = ("connect", "resolv", "dns", "refused", "handshake", "no route",
                    "unreachable")


def _never_connected(details: str) -> bool:
    text = details.lower()
    return not text or any(marker in text for marker in _NEVER_CONNECTED)


def is_transport_failure(details: str) -> bool:
    """True when an UNAVAILABLE status came from gRPC on this side (nothing was reached)."""
    text = details.lower()
    return not text or any(marker in text for marker in _TRANSPORT_MARKERS)


def event_record(msg: events_pb2.Event) -> dict[str, Any]:
    """An event as its JSON record: the layout of
    :meth:`coordinator.observability.events.Event.to_json` (what the Kafka sink sends), for
    any kind, a newer coordinator's included."""
    return {"schema": msg.schema, "seq": msg.seq, "kind": msg.kind, "task_id": msg.task_id,
            "at": msg.at_unix_s, "round_number": msg.round_number, "device_id": msg.device_id,
            "reason": msg.reason, "detail": msg.detail, "values": dict(msg.values)}


class AdminClient:
    def __init__(self, target: str, *, timeout_s: float = 30.0,
                 tls: ClientTls | None = None, token: str | None = None) -> None:
        """``target``: the coordinator's address, or several comma-separated (replicas on one
        database): a call that one of them answers UNAVAILABLE (a standby replica, which
        serves reads only and names the leader, or an address nobody answers) goes to the
        next, and the client stays with the one that served. ``tls``: verify the
        coordinator against its CA (and present a client certificate when it holds one);
        None: plaintext. ``token``: the API token (or OIDC JWT) every call carries as
        ``authorization: Bearer``."""
        self.targets = [t.strip() for t in target.split(",") if t.strip()] or [target]
        self._current = 0
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout_s = timeout_s
        self.tls = tls
        options = [("grpc.max_receive_message_length", 8 << 20)]
        if tls is None:
            self._channels = [grpc.insecure_channel(t, options=options) for t in self.targets]
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=tls.ca_pem, private_key=tls.key_pem,
                certificate_chain=tls.cert_chain_pem)
            self._channels = [grpc.secure_channel(t, credentials, options=options)
                              for t in self.targets]
        self._stubs = [admin_pb2_grpc.AdminServiceStub(c) for c in self._channels]

    @property
    def target(self) -> str:
        """The address calls go to now."""
        return self.targets[self._current]

    @property
    def _stub(self) -> admin_pb2_grpc.AdminServiceStub:
        return self._stubs[self._current]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object) -> object:
        return self._each_address(lambda: getattr(self._stub, method)(
            request, timeout=self.timeout_s, metadata=self._metadata))

    def _each_address(self, call: Any) -> Any:
        """``call()`` at the current address, then at each next one while the answer says
        the call was not served there: a standby replica's refusal, or no connection at all
        (a call whose connection broke after it was sent is not repeated elsewhere: a change
        must not be made twice). If none served: the most telling error (a coordinator's
        own over a standby's refusal)."""
        errors: list[tuple[bool, AdminError]] = []
        for _ in self.targets:
            try:
                return call()
            except grpc.RpcError as exc:
                error = self._error(exc)
                details = exc.details() or ""
                standby = STANDBY_REFUSAL in details
                not_served = exc.code() == grpc.StatusCode.UNAVAILABLE and (
                    standby or _never_connected(details))
                if not not_served or len(self.targets) == 1:
                    raise error from None
                errors.append((standby, error))
                self._current = (self._current + 1) % len(self.targets)
        raise next((e for standby, e in errors if not standby), errors[0][1])

    def _error(self, exc: grpc.RpcError) -> AdminError:
        code = exc.code()
        if code != grpc.StatusCode.UNAVAILABLE:
            return AdminError(code.name, exc.details() or "")
        details = exc.details() or ""
        if not is_transport_failure(details):
            # The coordinator itself answered UNAVAILABLE (e.g. its database is down).
            return AdminError("UNAVAILABLE", f"the coordinator at {self.target} cannot serve "
                                             f"this right now: {details}")
        return AdminError("UNAVAILABLE", cannot_reach(
            self.target, details, tls=self.tls is not None,
            client_cert=bool(self.tls is not None and self.tls.cert_chain_pem)))

    def create_task(self, spec: TaskSpec) -> admin_pb2.Task:
        req = admin_pb2.CreateTaskRequest(
            api_version=API_VERSION, spec=convert.task_spec_to_proto(spec)
        )
        resp = self._call("CreateTask", req)
        assert isinstance(resp, admin_pb2.CreateTaskResponse)
        return resp.task

    def get_task(self, task_id: str) -> admin_pb2.Task:
        resp = self._call("GetTask", admin_pb2.GetTaskRequest(api_version=API_VERSION,
                                                              task_id=task_id))
        assert isinstance(resp, admin_pb2.GetTaskResponse)
        return resp.task

    def list_tasks(self) -> list[admin_pb2.Task]:
        resp = self._call("ListTasks", admin_pb2.ListTasksRequest(api_version=API_VERSION))
        assert isinstance(resp, admin_pb2.ListTasksResponse)
        return list(resp.tasks)

    def list_rounds(self, task_id: str) -> list[admin_pb2.Round]:
        resp = self._call("ListRounds", admin_pb2.ListRoundsRequest(api_version=API_VERSION,
                                                                    task_id=task_id))
        assert isinstance(resp, admin_pb2.ListRoundsResponse)
        return list(resp.rounds)

    def cancel_task(self, task_id: str, reason: str = "") -> admin_pb2.Task:
        """Cancels the task; ``reason`` is stored with it (after "cancelled by an
        operator: ")."""
        resp = self._call("CancelTask", admin_pb2.CancelTaskRequest(
            api_version=API_VERSION, task_id=task_id, reason=reason))
        assert isinstance(resp, admin_pb2.CancelTaskResponse)
        return resp.task

    def list_events(self, task_id: str, after_seq: int = 0, limit: int = 0
                    ) -> admin_pb2.ListEventsResponse:
        """The task's events after ``after_seq`` (a page: ask again after the last one's seq
        until none come), with the task's state when they were read."""
        resp = self._call("ListEvents", admin_pb2.ListEventsRequest(
            api_version=API_VERSION, task_id=task_id, after_seq=after_seq, limit=limit))
        assert isinstance(resp, admin_pb2.ListEventsResponse)
        return resp

    def pull_model(self, task_id: str, version: int, out: Path) -> tuple[int, str, int]:
        """Writes the model to ``out`` atomically (``out``'s folder must exist); returns
        (version, sha256, size). Raises AdminError, or OSError when ``out`` cannot be
        written."""
        req = admin_pb2.AdminDownloadModelRequest(api_version=API_VERSION, task_id=task_id,
                                                  version=version)
        tmp = out.with_name(out.name + ".part")
        digest = hashlib.sha256()
        size = 0
        header = None

        def download() -> None:
            nonlocal header, size, digest
            header, size, digest = None, 0, hashlib.sha256()
            with open(tmp, "wb") as f:  # a retry at another address starts the file again
                for msg in self._stub.DownloadModel(req, timeout=600, metadata=self._metadata):
                    if msg.HasField("header"):
                        header = msg.header
                    else:
                        f.write(msg.chunk)
                        digest.update(msg.chunk)
                        size += len(msg.chunk)

        try:
            self._each_address(download)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if header is None or size != header.size_bytes or digest.hexdigest() != header.sha256:
            tmp.unlink(missing_ok=True)
            raise AdminError("DATA_LOSS", "downloaded model does not match its size/sha256")
        tmp.replace(out)
        return header.version, header.sha256, size

    # -- tokens, devices, audit -------------------------------------------------------------

    def create_token(self, role: str, label: str = "", expires_in_s: int = 0
                     ) -> tuple[admin_pb2.ApiToken, str]:
        resp = self._call("CreateToken", admin_pb2.CreateTokenRequest(
            api_version=API_VERSION, role=role, label=label, expires_in_s=expires_in_s))
        assert isinstance(resp, admin_pb2.CreateTokenResponse)
        return resp.token, resp.secret

    def list_tokens(self) -> list[admin_pb2.ApiToken]:
        resp = self._call("ListTokens", admin_pb2.ListTokensRequest(api_version=API_VERSION))
        assert isinstance(resp, admin_pb2.ListTokensResponse)
        return list(resp.tokens)

    def revoke_token(self, token_id: str) -> admin_pb2.ApiToken:
        resp = self._call("RevokeToken", admin_pb2.RevokeTokenRequest(
            api_version=API_VERSION, token_id=token_id))
        assert isinstance(resp, admin_pb2.RevokeTokenResponse)
        return resp.token

    def create_enrollment_token(self, max_devices: int, expires_in_s: int = 0, label: str = ""
                                ) -> admin_pb2.CreateEnrollmentTokenResponse:
        resp = self._call("CreateEnrollmentToken", admin_pb2.CreateEnrollmentTokenRequest(
            api_version=API_VERSION, max_devices=max_devices, expires_in_s=expires_in_s,
            label=label))
        assert isinstance(resp, admin_pb2.CreateEnrollmentTokenResponse)
        return resp

    def list_devices(self) -> list[admin_pb2.Device]:
        resp = self._call("ListDevices", admin_pb2.ListDevicesRequest(api_version=API_VERSION))
        assert isinstance(resp, admin_pb2.ListDevicesResponse)
        return list(resp.devices)

    def revoke_device(self, device_id: str) -> admin_pb2.Device:
        resp = self._call("RevokeDevice", admin_pb2.RevokeDeviceRequest(
            api_version=API_VERSION, device_id=device_id))
        assert isinstance(resp, admin_pb2.RevokeDeviceResponse)
        return resp.device

    def list_audit(self, limit: int = 100) -> list[admin_pb2.AuditEntry]:
        resp = self._call("ListAudit", admin_pb2.ListAuditRequest(api_version=API_VERSION,
                                                                  limit=limit))
        assert isinstance(resp, admin_pb2.ListAuditResponse)
        return list(resp.entries)

    def whoami(self) -> tuple[str, str]:
        resp = self._call("WhoAmI", admin_pb2.WhoAmIRequest(api_version=API_VERSION))
        assert isinstance(resp, admin_pb2.WhoAmIResponse)
        return resp.actor, resp.role


# ---------------------------------------------------------------- launching from a task file
# `fedctl task launch` and `fedctl experiment launch` read a task file, create the task and
# print it the same way; the refusals name the file (and, from the file's own checks, the
# field).


def load_launch_file(path: Path, *, source_task: str | None = None) -> TaskSpec:
    """The task file at ``path``, ``source_task`` (``--source-task``) applied as
    ``evaluate.source_task`` before it is validated.

    Raises:
        CliError: exit code 2, naming the file and the field.
    """
    from core.taskspec import TaskSpecError, load_task_file

    overrides = {} if source_task is None else {"evaluate.source_task": source_task}
    try:
        # A training task's file refuses the override: "field 'evaluate': only a task of kind
        # 'evaluate' has this section".
        return load_task_file(path, overrides=overrides)
    except TaskSpecError as exc:
        raise CliError(str(exc), exit_code=2) from None


def launch_task(client: AdminClient, spec: TaskSpec, *, source: Path | str,
                what: str = "task") -> admin_pb2.Task:
    """Creates the task; ``source`` (the file) and ``what`` ("task", "experiment") word the
    refusal.

    Raises:
        CliError: the coordinator cannot be reached, or it refused the task (with its reason).
    """
    try:
        return client.create_task(spec)
    except AdminError as exc:
        if exc.unreachable:
            raise CliError(str(exc)) from None
        raise CliError(f"{source}: coordinator refused the {what}: {exc}") from None


def print_launched(task: admin_pb2.Task, *, as_json: bool) -> None:
    """The created task's id on stdout, or (``as_json``) its JSON document and nothing else."""
    if as_json:
        from fedctl.output import print_json, task_document

        print_json(task_document(task))
    else:
        print(task.task_id)
