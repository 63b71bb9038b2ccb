"""An upload keeps its id across the client's retries, so the coordinator can answer a retry
of an upload it already counted instead of refusing it as a duplicate."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc

from core.protocol import Participation, UpdateHeader
from core.tensors import TensorInfo, sha256_hex
from device_agent.transport.client import DeviceClient, RetryPolicy
from protos.fedcoord.v1 import device_pb2, device_pb2_grpc


class FlakyUploads(device_pb2_grpc.DeviceServiceServicer):
    """Reads every upload whole, then fails the first one as if the coordinator went away."""

    def __init__(self) -> None:
        self.upload_ids: list[str] = []

    def UploadUpdate(self, request_iterator: Iterator[device_pb2.UploadUpdateRequest],
                     context: grpc.ServicerContext) -> device_pb2.UploadUpdateResponse:
        header = next(request_iterator).header
        for _ in request_iterator:
            pass
        self.upload_ids.append(header.upload_id)
        if len(self.upload_ids) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        return device_pb2.UploadUpdateResponse(accepted=True, message="update accepted")


def test_a_retried_upload_sends_the_same_upload_id() -> None:
    servicer = FlakyUploads()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    device_pb2_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = DeviceClient(f"127.0.0.1:{port}",
                          policy=RetryPolicy(base_s=0.01, cap_s=0.05, give_up_after_s=10))
    try:
        payload = bytes(40)
        header = UpdateHeader(Participation("d", "t", 1, "token"), 5,
                              [TensorInfo("w", "float32", (10,))], len(payload),
                              sha256_hex(payload), {}, upload_id="u" * 32)
        assert client.upload_update(header, payload, 16) == "update accepted"
        assert servicer.upload_ids == ["u" * 32, "u" * 32]
    finally:
        client.close()
        server.stop(0)
