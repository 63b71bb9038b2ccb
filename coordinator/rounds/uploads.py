"""Streaming update uploads: spooled to disk, checked, then folded into the aggregate.

Memory stays at about one chunk per upload in flight plus the O(model) accumulator: bytes
go to a spool file as they arrive, and the file is read back in fixed-size chunks twice,
once to check every value is finite, once to add it to the running weighted sum. An update
therefore touches the aggregate only after it has been checked whole.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from coordinator.rounds.errors import InvalidRequest, TooLarge
from core.aggregation.fedavg import StreamingWeightedMean, is_finite

#: Bytes read back per step when checking and aggregating a spooled update (float32-aligned).
READ_CHUNK_BYTES = 4 << 20


class SpooledUpload:
    """Receives the chunks of one update into ``path``; not thread-safe."""

    def __init__(self, path: Path, *, declared_bytes: int, sha256: str, max_chunk_bytes: int) -> None:
        self.path = path
        self.declared_bytes = declared_bytes
        self.sha256 = sha256.lower()
        self.max_chunk_bytes = max_chunk_bytes
        self.received = 0
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in finish()/discard()

    def write(self, chunk: bytes) -> None:
        if len(chunk) > self.max_chunk_bytes:
            raise InvalidRequest(
                f"chunk of {len(chunk)} bytes exceeds the maximum chunk size of "
                f"{self.max_chunk_bytes} bytes"
            )
        if self.received + len(chunk) > self.declared_bytes:
            raise TooLarge(
                f"update sent more than its declared {self.declared_bytes} bytes; "
                "the upload was dropped"
            )
        self._file.write(chunk)
        self._hash.update(chunk)
        self.received += len(chunk)

    def finish(self) -> Path:
        """Closes the file; raises InvalidRequest if size or hash disagree with the header."""
        self._file.close()
        if self.received != self.declared_bytes:
            raise InvalidRequest(
                f"update ended after {self.received} bytes but its header declared "
                f"{self.declared_bytes}"
            )
        digest = self._hash.hexdigest()
        if digest != self.sha256:  # never skipped: an empty hash is refused at the header
            raise InvalidRequest(
                f"update sha256 {digest[:16]}... does not match the header's {self.sha256[:16]}..."
            )
        return self.path

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def iter_float32(
    path: Path, chunk_bytes: int = READ_CHUNK_BYTES
) -> Iterator[tuple[int, npt.NDArray[np.float32]]]:
    """Yields (element offset, float32 array) over a raw little-endian float32 file."""
    offset = 0
    with open(path, "rb") as f:
        while True:
            data = f.read(chunk_bytes)
            if not data:
                return
            values = np.frombuffer(data, dtype="<f4")
            yield offset, values
            offset += values.size


def all_finite(path: Path) -> bool:
    return all(is_finite(values) for _, values in iter_float32(path))


def accumulate(path: Path, into: StreamingWeightedMean, weight: float) -> None:
    """Adds ``weight`` x the update in ``path`` to ``into`` and counts it as one update."""
    for offset, values in iter_float32(path):
        into.add_chunk(offset, values, weight)
    into.finish_update(weight)
