"""Streaming update uploads: spooled to disk, checked, then folded into the aggregate.

Memory stays at about one chunk per upload in flight plus the O(model) accumulator. Each
chunk is handled once as it arrives: written to the spool file, hashed and added to the
update's L2 norm (which is finite exactly when every value is), so checking the update
needs no pass over the file. The aggregator reads the file back once, to add the update to
the running weighted sum, and only after the whole update was checked.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from coordinator.rounds.errors import CoordinatorError, InvalidRequest, TooLarge
from core.aggregation.bounds import StreamingL2Norm
from core.aggregation.fedavg import StreamingWeightedMean, is_finite
from core.protocol import UpdateHeader

#: Bytes read back per step when checking and aggregating a spooled update (float32-aligned).
READ_CHUNK_BYTES = 4 << 20


class SpooledUpload:
    """Receives the chunks of one update into ``path``. Not thread-safe, except that
    :meth:`discard` may run while :meth:`finish` runs on another thread (a call cancelled
    while its upload is verified)."""

    def __init__(self, path: Path, *, declared_bytes: int, sha256: str, max_chunk_bytes: int) -> None:
        self.path = path
        self.declared_bytes = declared_bytes
        self.sha256 = sha256.lower()
        self.max_chunk_bytes = max_chunk_bytes
        self.received = 0
        self._hash = hashlib.sha256()
        self._norm = StreamingL2Norm()
        #: The bytes of a float32 value split across two chunks (a sender may cut anywhere).
        self._partial = b""
        self._closing = threading.Lock()
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
        data = self._partial + chunk if self._partial else chunk
        whole = len(data) - len(data) % 4
        self._norm.add(np.frombuffer(data, dtype="<f4", count=whole // 4))
        self._partial = bytes(data[whole:])

    @property
    def l2_norm(self) -> float:
        """The L2 norm of the float32 values received so far (NaN or inf when one is not
        finite); of the whole update once :meth:`finish` returned."""
        return self._norm.norm

    def finish(self) -> Path:
        """Closes the file; raises InvalidRequest if size or hash disagree with the header."""
        with self._closing:
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
        with self._closing:
            if not self._file.closed:
                self._file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class Receipt:
    """The answer a finished upload got: accepted (``refusal`` None) or the refusal of its
    content. Kept on the device's seat, so that the same upload retried (same upload id and
    hash) gets that answer again instead of ALREADY_EXISTS."""

    upload_id: str
    sha256: str
    refusal: CoordinatorError | None = None


class Upload:
    """An update being received: :meth:`write` its chunks, :meth:`verify` it once the stream
    ended, then :meth:`Participants.finish_upload <coordinator.rounds.participation.
    Participants.finish_upload>`; ``abort_upload`` in every case (it is idempotent).

    A ``replay`` (an upload retried after it finished) carries the first attempt's receipt
    and takes no data. Not thread-safe, except :meth:`verify` (see there)."""

    def __init__(self, header: UpdateHeader, round_id: int, spool: SpooledUpload | None, *,
                 replay: Receipt | None = None) -> None:
        self.header = header
        self.round_id = round_id
        self.spool = spool
        self.replay = replay
        #: A retry of the same upload started while this one was still open; this one
        #: must not count.
        self.superseded = False
        self._norm: float | None = None

    @property
    def takes_data(self) -> bool:
        return self.replay is None

    def write(self, chunk: bytes) -> None:
        if self.spool is None:
            raise InvalidRequest("this upload was already answered; it takes no data")
        self.spool.write(chunk)

    def verify(self) -> float:
        """Ends the data: checks its size and hash against the header and returns the
        update's L2 norm (NaN or inf when a value is not finite), both computed as the chunks
        arrived. Raises InvalidRequest on a size or hash mismatch. Touches only this upload's
        spool file (it closes it, which may block on the disk), so the transport runs it off
        the event loop."""
        if self._norm is None:
            assert self.spool is not None, "a replay has nothing to verify"
            self.spool.finish()
            self._norm = self.spool.l2_norm
        return self._norm

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


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


def update_l2_norm(path: Path) -> float:
    """The L2 norm of the raw float32 update in ``path``; NaN or inf when a value is not
    finite. Reads only that file (safe off the event loop)."""
    norm = StreamingL2Norm()
    for _, values in iter_float32(path):
        norm.add(values)
    return norm.norm


def accumulate(path: Path, into: StreamingWeightedMean, weight: float, *,
               scale: float = 1.0) -> None:
    """Adds ``scale x weight`` x the update in ``path`` to ``into`` and counts it as one
    update of weight ``weight`` (``scale`` < 1 shrinks the update's share of the mean without
    renormalising it away: FedBuff's staleness weight)."""
    for offset, values in iter_float32(path):
        into.add_chunk(offset, values, weight * scale)
    into.finish_update(weight)
