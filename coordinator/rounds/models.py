"""Model versions: safetensors files in the blob store, their records in the round store.

:meth:`ModelRepository.write` touches only files, so the commit worker may call it off the
event loop; everything that reads or writes the database runs on the loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import replace

import numpy as np

from coordinator.rounds.errors import NotFound, Unavailable
from coordinator.rounds.state import LoadedModel
from coordinator.storage import FileBlobStore, Store
from coordinator.storage import errors as storage_errors
from coordinator.storage.records import ModelVersionRecord
from core.evaluation import EvaluationPlan, read_plan
from core.tensors import (
    load_safetensors,
    sha256_hex,
    tensor_infos,
    write_safetensors,
)


class RecentModelBytes:
    """The bytes of the model files most recently written or read, up to ``max_bytes`` in
    all (least recently used first out; a file over ``max_item_bytes`` is never kept): every
    device of a round downloads the same version, and serving it from memory takes the
    file reads off the event loop. Keyed by path and sha256, so a rewritten file is not
    served stale. Thread-safe."""

    def __init__(self, *, max_bytes: int = 256 << 20, max_item_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.max_item_bytes = max_item_bytes
        self._items: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, path: str, sha256: str) -> bytes | None:
        with self._lock:
            data = self._items.get((path, sha256))
            if data is not None:
                self._items.move_to_end((path, sha256))
            return data

    def put(self, path: str, sha256: str, data: bytes) -> None:
        if len(data) > self.max_item_bytes:
            return
        with self._lock:
            old = self._items.pop((path, sha256), None)
            self._size -= len(old) if old is not None else 0
            self._items[(path, sha256)] = data
            self._size += len(data)
            while self._size > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)

    @property
    def size_bytes(self) -> int:
        return self._size


class ModelRepository:
    def __init__(self, store: Store, blobs: FileBlobStore,
                 recent: RecentModelBytes | None = None) -> None:
        self._store = store
        self._blobs = blobs
        self.recent = recent if recent is not None else RecentModelBytes()

    def write(self, task_id: str, version: int, round_number: int,
              params: dict[str, np.ndarray], opt_state: dict[str, np.ndarray] | None,
              now: float, metadata: Mapping[str, str] | None = None) -> ModelVersionRecord:
        """Writes the files of a version (atomically each) and returns its record; the
        caller commits the record. ``metadata``: more entries of the safetensors header (an
        evaluation task's plan). Thread-safe (files only)."""
        base = f"tasks/{task_id}/model-v{version:06d}"
        sha, size = self._write_tensors(
            f"{base}.safetensors", params,
            {**(metadata or {}), "task_id": task_id, "version": str(version)},
            keep=True)  # the next download of a round
        opt_path = None
        if opt_state:
            opt_path = f"{base}.optimizer.safetensors"
            self._write_tensors(opt_path, opt_state, None, keep=False)
        return ModelVersionRecord(
            task_id=task_id, version=version, round_number=round_number,
            path=f"{base}.safetensors", sha256=sha, size_bytes=size,
            optimizer_state_path=opt_path, created_at=now,
        )

    def _write_tensors(self, path: str, state: Mapping[str, np.ndarray],
                       metadata: Mapping[str, str] | None, *, keep: bool) -> tuple[str, int]:
        """Writes a safetensors file straight from the arrays and returns its (sha256,
        size); a file small enough for :attr:`recent` is read back into it when ``keep``.
        Building the file in memory instead (:func:`~core.tensors.save_safetensors`) held
        two copies of the model and the GIL while it serialized (half a second per 200 MB:
        the event loop stood still during a commit off the loop)."""
        sha, size = self._blobs.write_file(
            path, lambda tmp: write_safetensors(state, tmp, metadata))
        if keep and size <= self.recent.max_item_bytes:
            self.recent.put(path, sha, self._blobs.read_bytes(path))
        return sha, size

    def stored_plan(self, record: ModelVersionRecord) -> EvaluationPlan | None:
        """The evaluation plan in a version's file (an evaluation task's bundle); None when
        the file carries none.

        Raises:
            TensorFormatError: the file's header or the plan in it is unreadable.
        """
        return read_plan(self._blobs.read_bytes(record.path))

    def load(self, record: ModelVersionRecord) -> LoadedModel:
        """Reads a version back. Raises Unavailable when its file does not match its hash."""
        data = self._blobs.read_bytes(record.path)
        if sha256_hex(data) != record.sha256:
            raise Unavailable(
                f"model file {record.path} does not match its recorded sha256; "
                "refusing to continue the task from a corrupted model"
            )
        params = load_safetensors(data)
        opt = None
        if record.optimizer_state_path:
            opt = load_safetensors(self._blobs.read_bytes(record.optimizer_state_path))
        infos = tensor_infos(params)
        return LoadedModel(record.version, params, infos, sum(i.nbytes for i in infos), record,
                           opt)

    def initial(self, task_id: str, params: dict[str, np.ndarray], now: float,
                metadata: Mapping[str, str] | None = None
                ) -> tuple[ModelVersionRecord, LoadedModel]:
        """Writes version 0 and returns its record and the loaded model."""
        record = self.write(task_id, 0, 0, params, None, now, metadata)
        infos = tensor_infos(params)
        return record, LoadedModel(0, params, infos, sum(i.nbytes for i in infos), record, None)

    @staticmethod
    def same_file(base: LoadedModel, round_number: int, now: float) -> LoadedModel:
        """The next version of a task whose round changed no parameter (an evaluation
        round): a record of ``base``'s file, nothing written. Thread-safe."""
        record = replace(base.record, version=base.version + 1, round_number=round_number,
                         created_at=now)
        return replace(base, version=record.version, record=record)

    def version(self, task_id: str, version: int | None) -> ModelVersionRecord:
        """The record of ``version`` (None: the latest committed one)."""
        try:
            if version is None:
                return self._store.latest_model_version(task_id)
            return self._store.get_model_version(task_id, version)
        except storage_errors.NotFound:
            raise NotFound(f"task {task_id} has no model version {version}") from None

    def chunks(self, record: ModelVersionRecord, chunk_bytes: int) -> Iterator[bytes]:
        """The version's file in chunks: from memory when it is one of the recent ones (a
        file small enough is read once and kept), else streamed from disk."""
        data = self.recent.get(record.path, record.sha256)
        if data is None and record.size_bytes <= self.recent.max_item_bytes:
            data = self._blobs.read_bytes(record.path)
            if sha256_hex(data) == record.sha256:  # a damaged file is served, never kept
                self.recent.put(record.path, record.sha256, data)
        if data is not None:
            view = memoryview(data)
            for start in range(0, len(data), chunk_bytes):
                yield bytes(view[start:start + chunk_bytes])
            return
        with self._blobs.open_read(record.path) as f:
            while chunk := f.read(chunk_bytes):
                yield chunk
