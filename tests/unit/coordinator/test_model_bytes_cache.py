"""Every device of a round downloads the same model version: its bytes are served from
memory (written or read once), so downloads do no file reads on the event loop; the memory
is bounded, and a file is never served stale or kept damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.rounds.models import ModelRepository, RecentModelBytes
from coordinator.storage import FileBlobStore, InMemoryStore

PARAMS = {"w": np.arange(3000, dtype=np.float32).reshape(30, 100), "b": np.zeros(30, np.float32)}


class CountingBlobs(FileBlobStore):
    """A blob store that counts the files read (opened or read whole)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads = 0

    def open_read(self, relpath: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        return super().open_read(relpath)


def repository(tmp_path: Path, recent: RecentModelBytes | None = None
               ) -> tuple[ModelRepository, CountingBlobs]:
    blobs = CountingBlobs(tmp_path / "blobs")
    return ModelRepository(InMemoryStore(), blobs, recent), blobs


def test_a_version_just_written_is_downloaded_from_memory_in_the_files_bytes(
        tmp_path: Path) -> None:
    models, blobs = repository(tmp_path)
    record = models.write("t", 1, 1, PARAMS, None, now=0.0)
    blobs.reads = 0  # the write reads its file back into memory (on the commit worker)
    file_bytes = (tmp_path / "blobs" / record.path).read_bytes()
    for _ in range(3):
        assert b"".join(models.chunks(record, 1000)) == file_bytes
    assert blobs.reads == 0
    assert [len(c) for c in models.chunks(record, 5000)][:-1] == [5000] * (len(file_bytes)
                                                                         // 5000)


def test_a_version_not_in_memory_is_read_once_then_kept(tmp_path: Path) -> None:
    models, blobs = repository(tmp_path)
    record = models.write("t", 1, 1, PARAMS, None, now=0.0)
    again, blobs = repository(tmp_path)  # a restarted coordinator: nothing in memory
    first = b"".join(again.chunks(record, 4096))
    assert b"".join(again.chunks(record, 4096)) == first
    assert blobs.reads == 1


def test_memory_is_bounded_least_recently_used_first_out() -> None:
    recent = RecentModelBytes(max_bytes=250, max_item_bytes=100)
    for i in range(3):
        recent.put(f"v{i}", "h", bytes(100))
    assert recent.get("v0", "h") is None and recent.size_bytes == 200
    assert recent.get("v1", "h") is not None  # used: v2 goes out before it
    recent.put("v3", "h", bytes(100))
    assert recent.get("v2", "h") is None and recent.get("v1", "h") is not None
    recent.put("big", "h", bytes(101))  # over the per-file limit: streamed, never kept
    assert recent.get("big", "h") is None and recent.size_bytes == 200


def test_a_large_file_streams_from_disk_and_a_damaged_one_is_never_kept(
        tmp_path: Path) -> None:
    models, blobs = repository(tmp_path, RecentModelBytes(max_item_bytes=1000))
    record = models.write("t", 1, 1, PARAMS, None, now=0.0)  # ~12 KB: over the limit
    assert models.recent.size_bytes == 0
    assert len(b"".join(models.chunks(record, 4096))) == record.size_bytes
    assert blobs.reads == 1

    models, blobs = repository(tmp_path)
    small = models.write("t", 2, 2, {"b": np.zeros(4, np.float32)}, None, now=0.0)
    path = tmp_path / "blobs" / small.path
    again, blobs = repository(tmp_path)
    path.write_bytes(path.read_bytes()[:-1] + b"\x01")  # damaged on disk after its record
    b"".join(again.chunks(small, 4096))
    b"".join(again.chunks(small, 4096))
    assert blobs.reads == 2  # read each time: a damaged file is not kept


def test_a_rewritten_file_is_not_served_stale(tmp_path: Path) -> None:
    models, _ = repository(tmp_path)
    first = models.write("t", 1, 1, PARAMS, None, now=0.0)
    second = models.write("t", 1, 1, {"w": PARAMS["w"] * 2}, None, now=1.0)  # same path
    assert first.path == second.path and first.sha256 != second.sha256
    assert b"".join(models.chunks(second, 4096)) == (tmp_path / "blobs" / second.path
                                                      ).read_bytes()
    assert b"".join(models.chunks(second, 4096)) != b"".join(models.chunks(first, 4096))
