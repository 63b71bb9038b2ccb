"""FileBlobStore: model files on a local disk, addressed by paths relative to its root.

A write is all or nothing, also across a crash or power loss: the data goes to a temporary
file in the destination's directory, is flushed to disk, renamed over the destination
(atomic on POSIX) and the directory is flushed too. A reader sees the old file or the new
one, never a mix, and no half-written file ever carries a blob's name.

Names starting with a dot are the store's own (temporary files, the upload spool under
``.spool/``) and are refused as blob paths, as are paths that leave the root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from coordinator.storage.errors import BlobError

_SPOOL = ".spool"
_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


class FileBlobStore:
    """Files under ``root`` (created if absent). Paths are POSIX-style and relative, such as
    ``tasks/t1/model-v000001.safetensors``.

    Every method raises BlobError for a path that is absolute, contains ``..`` or a
    component starting with ``.``, or leads out of the root through a symbolic link, and for
    a file that cannot be read or written. Thread-safe for distinct paths; concurrent writes
    of one path leave one of the writes whole.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobError(f"cannot create the blob store {self.root}: {exc}") from exc

    def write(self, relpath: str, data: bytes) -> tuple[str, int]:
        """Stores ``data`` at ``relpath`` atomically, replacing any previous file, and returns
        its (sha256 hex digest, size in bytes)."""
        def fill(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        self._replace(relpath, fill)
        return hashlib.sha256(data).hexdigest(), len(data)

    def write_file(self, relpath: str, fill: Callable[[Path], None]) -> tuple[str, int]:
        """Stores at ``relpath``, as atomically as :meth:`write`, the file that ``fill(tmp)``
        writes at a temporary path (a file too large to build in memory first), and returns
        its (sha256 hex digest, size in bytes), read back in 1 MiB chunks. When ``fill``
        raises, the old file (or none) stays and the exception propagates (an OSError as
        BlobError)."""
        digest: list[tuple[str, int]] = []

        def fill_and_hash(tmp: Path) -> None:
            fill(tmp)
            digest.append(_sha256_and_size(tmp))

        self._replace(relpath, fill_and_hash)
        return digest[0]

    def _replace(self, relpath: str, fill: Callable[[Path], None]) -> None:
        """A temporary file in the destination's directory, written by ``fill``, flushed to
        disk, renamed over the destination; then the directory is flushed."""
        path = self._path(relpath)
        try:
            _make_dirs(path.parent, self.root)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
            os.close(fd)
            try:
                fill(Path(tmp))
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            raise BlobError(f"cannot write blob {relpath}: {exc}") from exc

    def open_read(self, relpath: str) -> BinaryIO:
        """The file opened for binary reading; the caller closes it."""
        path = self._path(relpath)
        try:
            return open(path, "rb")
        except OSError as exc:
            raise BlobError(f"cannot read blob {relpath}: {exc}") from exc

    def read_bytes(self, relpath: str) -> bytes:
        with self.open_read(relpath) as f:
            try:
                return f.read()
            except OSError as exc:
                raise BlobError(f"cannot read blob {relpath}: {exc}") from exc

    def size(self, relpath: str) -> int:
        """Size in bytes."""
        path = self._path(relpath)
        try:
            return path.stat().st_size
        except OSError as exc:
            raise BlobError(f"cannot read blob {relpath}: {exc}") from exc

    def exists(self, relpath: str) -> bool:
        return self._path(relpath).is_file()

    def sha256(self, relpath: str) -> str:
        """Hex digest of the file, read in 1 MiB chunks (memory stays flat for any size)."""
        digest = hashlib.sha256()
        with self.open_read(relpath) as f:
            try:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            except OSError as exc:
                raise BlobError(f"cannot read blob {relpath}: {exc}") from exc
        return digest.hexdigest()

    def spool_path(self, name: str) -> Path:
        """A path under ``root/.spool/`` (created) for a temporary upload file. The caller
        creates and removes the file; :meth:`clear_spool` removes what is left over.
        ``name`` is a plain file name."""
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
            raise BlobError(f"spool file name {name!r} is not a plain file name")
        spool = self.root / _SPOOL
        try:
            spool.mkdir(exist_ok=True)
        except OSError as exc:
            raise BlobError(f"cannot create the spool directory {spool}: {exc}") from exc
        return spool / name

    def lock(self) -> None:
        """Takes the store for this process (an exclusive ``flock`` on ``.lock``, released when
        the process ends or :meth:`unlock` is called); BlobError if another process holds it,
        so two coordinators never serve from one store."""
        import fcntl

        if getattr(self, "_lock_fd", None) is not None:
            return
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BlobError(
                f"the model store {self.root} is in use by another coordinator process"
            ) from None
        self._lock_fd: int | None = fd

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def clear_spool(self) -> None:
        """Removes the spool directory and everything in it (at start-up: uploads that were
        in flight when the coordinator stopped)."""
        shutil.rmtree(self.root / _SPOOL, ignore_errors=True)

    def _path(self, relpath: str) -> Path:
        rel = PurePosixPath(relpath)
        if (
            not relpath
            or "\0" in relpath
            or "\\" in relpath
            or rel.is_absolute()
            or not rel.parts
            or any(part.startswith(".") for part in rel.parts)
        ):
            raise BlobError(
                f"blob path {relpath!r} is not a relative path inside the store "
                "(no '..', no names starting with '.')"
            )
        path = self.root.joinpath(*rel.parts)
        if not path.resolve().is_relative_to(self.root):
            raise BlobError(f"blob path {relpath!r} leads out of the store through a link")
        return path


def _make_dirs(directory: Path, root: Path) -> None:
    """Creates ``directory`` and its missing parents below ``root``, flushing each new entry
    to disk so that a file written there survives a power loss."""
    missing = []
    while not directory.is_dir() and directory != root:
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        _fsync_dir(d.parent)


def _sha256_and_size(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
