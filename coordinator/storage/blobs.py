"""Model files on disk: written atomically, addressed by paths relative to the store root."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from coordinator.storage.errors import BlobError

_SPOOL = ".spool"


class FileBlobStore:
    """Files under ``root``. A write is all-or-nothing: temp file, fsync, rename, fsync dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobError(f"cannot create the model store {self.root}: {exc.strerror}") from None

    def _path(self, relpath: str) -> Path:
        rel = PurePosixPath(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or relpath.startswith(_SPOOL):
            raise BlobError(f"blob path {relpath!r} is not inside the store")
        return self.root / rel

    def write(self, relpath: str, data: bytes) -> tuple[str, int]:
        """Writes ``data`` atomically; returns (sha256 hex, size)."""
        path = self._path(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return hashlib.sha256(data).hexdigest(), len(data)

    def open_read(self, relpath: str) -> BinaryIO:
        try:
            return open(self._path(relpath), "rb")
        except OSError as exc:
            raise BlobError(f"cannot read {relpath}: {exc.strerror}") from None

    def read_bytes(self, relpath: str) -> bytes:
        with self.open_read(relpath) as f:
            return f.read()

    def size(self, relpath: str) -> int:
        return self._path(relpath).stat().st_size

    def exists(self, relpath: str) -> bool:
        return self._path(relpath).is_file()

    def sha256(self, relpath: str) -> str:
        digest = hashlib.sha256()
        with self.open_read(relpath) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def spool_path(self, name: str) -> Path:
        """A path for a temporary upload file (removed by :meth:`clear_spool` at start-up)."""
        if "/" in name or name.startswith("."):
            raise BlobError(f"bad spool name {name!r}")
        spool = self.root / _SPOOL
        spool.mkdir(exist_ok=True)
        return spool / name

    def clear_spool(self) -> None:
        shutil.rmtree(self.root / _SPOOL, ignore_errors=True)
