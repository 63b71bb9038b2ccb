"""FileBlobStore: model files written all-or-nothing, addressed only inside the store root."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.storage import BlobError, FileBlobStore

MODEL = "tasks/t1/model-v000001.safetensors"


@pytest.fixture
def blobs(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "store")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- writing and reading -------------------------------------------------------------------


def test_write_returns_the_sha256_and_size_and_the_file_reads_back(blobs: FileBlobStore) -> None:
    data = b"weights" * 1000

    digest, size = blobs.write(MODEL, data)

    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert blobs.exists(MODEL)
    assert blobs.read_bytes(MODEL) == data
    with blobs.open_read(MODEL) as f:
        assert f.read() == data
    assert blobs.size(MODEL) == len(data)
    assert blobs.sha256(MODEL) == digest
    assert (blobs.root / "tasks" / "t1" / "model-v000001.safetensors").read_bytes() == data


def test_a_write_replaces_the_previous_file_whole(blobs: FileBlobStore) -> None:
    blobs.write(MODEL, b"old content, longer than the new one")

    blobs.write(MODEL, b"new")

    assert blobs.read_bytes(MODEL) == b"new"
    assert files_under(blobs.root) == [MODEL]


def test_an_empty_file_is_a_file(blobs: FileBlobStore) -> None:
    assert blobs.write("empty", b"") == (hashlib.sha256(b"").hexdigest(), 0)
    assert blobs.exists("empty") and blobs.read_bytes("empty") == b""


def test_sha256_of_a_file_larger_than_its_read_chunk(blobs: FileBlobStore) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    blobs.write(MODEL, data)

    assert blobs.sha256(MODEL) == hashlib.sha256(data).hexdigest()


def test_a_missing_file_does_not_exist_and_reading_it_is_a_blob_error(
    blobs: FileBlobStore,
) -> None:
    assert not blobs.exists(MODEL)
    for read in (blobs.read_bytes, blobs.open_read, blobs.size, blobs.sha256):
        with pytest.raises(BlobError, match="model-v000001"):
            read(MODEL)


def test_a_directory_is_not_a_blob(blobs: FileBlobStore) -> None:
    blobs.write(MODEL, b"x")

    assert not blobs.exists("tasks/t1")
    with pytest.raises(BlobError):
        blobs.read_bytes("tasks/t1")


def test_the_root_is_created_and_a_root_that_cannot_be_is_a_blob_error(tmp_path: Path) -> None:
    assert FileBlobStore(tmp_path / "a" / "b").root.is_dir()

    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(BlobError):
        FileBlobStore(tmp_path / "file" / "store")


# -- atomicity -----------------------------------------------------------------------------


def test_a_crash_before_the_rename_keeps_the_old_file_and_leaves_no_stray_file(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs.write(MODEL, b"version 1")

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BlobError, match="Input/output error"):
        blobs.write(MODEL, b"version 2, never complete")
    monkeypatch.undo()

    assert blobs.read_bytes(MODEL) == b"version 1"
    assert files_under(blobs.root) == [MODEL]
    for name in os.listdir(blobs.root / "tasks" / "t1"):
        assert blobs.exists(f"tasks/t1/{name}") == (name == "model-v000001.safetensors")


def test_a_crash_while_writing_a_new_file_leaves_nothing(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(src: object, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        blobs.write(MODEL, b"data")
    monkeypatch.undo()

    assert not blobs.exists(MODEL)
    assert files_under(blobs.root) == []


@pytest.mark.parametrize("write", [
    pytest.param(lambda blobs, path: blobs.write(path, b"data"), id="bytes"),
    pytest.param(lambda blobs, path: blobs.write_file(path, write_large), id="write_file"),
])
def test_the_data_is_on_disk_before_the_rename_and_the_rename_after_it(
    blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch,
    write: Callable[[FileBlobStore, str], object],
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    blobs.write("tasks/existing-dir-marker", b"")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    write(blobs, "tasks/m.bin")

    assert events == ["fsync-file", "rename", "fsync-dir"]


def write_large(path: Path) -> None:
    """A ``fill`` of write_file: writes the file itself, as a serializer that streams does."""
    with open(path, "wb") as f:
        for i in range(3):
            f.write(bytes([i]) * (1 << 20))


def test_write_file_stores_what_fill_wrote_and_returns_its_sha256_and_size(
    blobs: FileBlobStore,
) -> None:
    digest, size = blobs.write_file(MODEL, write_large)

    data = blobs.read_bytes(MODEL)
    assert size == len(data) == 3 << 20
    assert digest == hashlib.sha256(data).hexdigest() == blobs.sha256(MODEL)
    assert files_under(blobs.root) == [MODEL]


def test_a_fill_that_fails_keeps_the_old_file_and_leaves_no_stray_file(
    blobs: FileBlobStore,
) -> None:
    blobs.write(MODEL, b"version 1")

    def half_written(path: Path) -> None:
        path.write_bytes(b"version 2, half")
        raise OSError(28, "No space left on device")

    with pytest.raises(BlobError, match="No space left"):
        blobs.write_file(MODEL, half_written)

    assert blobs.read_bytes(MODEL) == b"version 1"
    assert files_under(blobs.root) == [MODEL]


# -- paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "relpath",
    [
        "/etc/passwd",
        "../outside",
        "tasks/../../outside",
        "tasks/../model",
        "",
        ".",
        ".spool/upload",
        "tasks/.tmp-abc123",
        "a\\..\\b",
        "nul\0byte",
    ],
)
def test_paths_outside_the_store_or_into_its_own_files_are_refused(
    blobs: FileBlobStore, relpath: str
) -> None:
    for call in (
        lambda: blobs.write(relpath, b"x"),
        lambda: blobs.open_read(relpath),
        lambda: blobs.read_bytes(relpath),
        lambda: blobs.size(relpath),
        lambda: blobs.exists(relpath),
        lambda: blobs.sha256(relpath),
    ):
        with pytest.raises(BlobError):
            call()
    assert not (blobs.root.parent / "outside").exists()


def test_a_symbolic_link_out_of_the_store_is_refused(blobs: FileBlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (blobs.root / "link").symlink_to(outside)

    with pytest.raises(BlobError, match="link"):
        blobs.write("link/model", b"x")
    assert list(outside.iterdir()) == []


# -- spool ---------------------------------------------------------------------------------


def test_spool_paths_lie_in_the_spool_directory_which_clear_spool_empties(
    blobs: FileBlobStore,
) -> None:
    path = blobs.spool_path("t1-7-abcd.upd")
    path.write_bytes(b"partial upload")

    assert path.parent == blobs.root / ".spool"
    assert blobs.exists("t1-7-abcd.upd") is False

    blobs.clear_spool()
    assert not path.exists()
    blobs.clear_spool()  # nothing to clear is fine
    assert blobs.spool_path("next.upd").parent.is_dir()


def test_clear_spool_leaves_the_blobs_alone(blobs: FileBlobStore) -> None:
    blobs.write(MODEL, b"model")
    blobs.spool_path("u.upd").write_bytes(b"upload")

    blobs.clear_spool()

    assert files_under(blobs.root) == [MODEL]


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "a\\b"])
def test_a_spool_name_is_a_plain_file_name(blobs: FileBlobStore, name: str) -> None:
    with pytest.raises(BlobError):
        blobs.spool_path(name)
