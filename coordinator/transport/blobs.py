"""Streaming a model version down: a header message, then chunks (shared by both services)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from coordinator.rounds.service import CoordinatorService
from coordinator.storage.records import ModelVersionRecord
from protos.fedcoord.v1 import common_pb2

#: Bytes per message when streaming a model down.
DOWNLOAD_CHUNK_BYTES = 1 << 20

M = TypeVar("M")


def model_messages(
    service: CoordinatorService, record: ModelVersionRecord, message: Callable[..., M]
) -> Iterator[M]:
    """``message(header=...)`` first, then ``message(chunk=...)`` until the file ends."""
    yield message(
        header=common_pb2.BlobHeader(
            size_bytes=record.size_bytes, sha256=record.sha256, format="safetensors",
            version=record.version,
        )
    )
    for chunk in service.model_chunks(record, DOWNLOAD_CHUNK_BYTES):
        yield message(chunk=chunk)
