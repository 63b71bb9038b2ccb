"""A hand-driven device speaking raw protobuf, to send what honest agents never would."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import grpc
import numpy as np

from core.security.identity import DeviceKey
from core.types import API_VERSION
from protos import convert
from protos.fedcoord.v1 import common_pb2, device_pb2, device_pb2_grpc


class RogueDevice:
    """A device with a key of its own, enrolled at once (``enroll=False``: not), that signs
    its check-ins as an honest one would; ``name`` is only for messages."""

    def __init__(self, target: str, name: str, *, max_message: int = 8 << 20,
                 key: DeviceKey | None = None, enroll: bool = True,
                 enrollment_token: str = "") -> None:
        self.name = name
        self.key = key or DeviceKey.generate()
        self.device_id = self.key.device_id
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 256 << 20),
                             ("grpc.max_receive_message_length", max_message)])
        self.stub = device_pb2_grpc.DeviceServiceStub(self.channel)
        self.participation: device_pb2.Participation | None = None
        self.plan: device_pb2.GetPlanResponse | None = None
        if enroll:
            self.enroll(enrollment_token)

    def enroll(self, enrollment_token: str = "") -> str:
        resp = self.stub.Enroll(device_pb2.EnrollRequest(
            api_version=API_VERSION, proof=convert.device_proof_to_proto(self.key.prove("enroll")),
            enrollment_token=enrollment_token), timeout=10)
        return resp.device_id

    def check_in_request(self, task_id: str, *, device_id: str | None = None,
                         key: DeviceKey | None = None) -> device_pb2.CheckInRequest:
        """A signed check-in: by default of this device; ``device_id`` claims another id
        (with this device's key, or ``key``)."""
        key = key or self.key
        return device_pb2.CheckInRequest(
            api_version=API_VERSION, device_id=device_id or key.device_id, task_id=task_id,
            attributes=common_pb2.DeviceAttributes(charging=True, unmetered=True, idle=True),
            proof=convert.device_proof_to_proto(key.prove("check-in", task_id)))

    def close(self) -> None:
        self.channel.close()

    def join(self, task_id: str, timeout_s: float = 60) -> device_pb2.GetPlanResponse:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.stub.CheckIn(self.check_in_request(task_id), timeout=10)
            if r.outcome == device_pb2.CheckInResponse.ACCEPTED:
                self.participation = device_pb2.Participation(
                    device_id=self.device_id, task_id=r.task_id, round_number=r.round_number,
                    token=r.participation_token)
                self.plan = self.stub.GetPlan(device_pb2.GetPlanRequest(
                    api_version=API_VERSION, participation=self.participation), timeout=10)
                return self.plan
            time.sleep(min(r.retry_after_ms / 1000, 0.5))
        raise TimeoutError(f"{self.name} was not selected in {timeout_s} s")

    def zero_update(self) -> bytes:
        assert self.plan is not None
        n = sum(int(np.prod(t.shape)) for t in self.plan.update_tensors)
        return np.zeros(n, dtype="<f4").tobytes()

    def upload(
        self,
        payload: bytes,
        *,
        tensors: list[common_pb2.TensorSpec] | None = None,
        total_bytes: int | None = None,
        sha256: str | None = None,
        num_examples: int = 10,
        api_version: int = API_VERSION,
        participation: device_pb2.Participation | None = None,
        chunk_bytes: int = 1 << 20,
        extra_bytes: int = 0,
        metrics: dict[str, float] | None = None,
        upload_id: str = "",
    ) -> device_pb2.UploadUpdateResponse:
        assert self.plan is not None and self.participation is not None
        header = device_pb2.UpdateHeader(
            api_version=api_version,
            participation=participation or self.participation,
            num_examples=num_examples,
            tensors=tensors if tensors is not None else list(self.plan.update_tensors),
            total_bytes=len(payload) if total_bytes is None else total_bytes,
            sha256=hashlib.sha256(payload).hexdigest() if sha256 is None else sha256,
            metrics=metrics or {},
            upload_id=upload_id,
        )

        def messages() -> Iterator[device_pb2.UploadUpdateRequest]:
            yield device_pb2.UploadUpdateRequest(header=header)
            view = memoryview(payload)
            for i in range(0, len(view), chunk_bytes):
                yield device_pb2.UploadUpdateRequest(chunk=bytes(view[i:i + chunk_bytes]))
            filler = bytes(chunk_bytes)
            for _ in range(extra_bytes // chunk_bytes):
                yield device_pb2.UploadUpdateRequest(chunk=filler)

        return self.stub.UploadUpdate(messages(), timeout=300)


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    """Runs ``call()`` expecting an RpcError; returns its code and details."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call was expected to fail")
