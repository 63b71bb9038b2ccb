"""Persistence of the coordinator: tasks, rounds, participants, model versions (a database
through :class:`Store`), and model files (:class:`FileBlobStore`)."""

from coordinator.storage.base import Store
from coordinator.storage.blobs import FileBlobStore
from coordinator.storage.errors import BlobError, Conflict, NotFound, StorageError
from coordinator.storage.memory import InMemoryStore
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    RoundRecord,
    TaskRecord,
)
from coordinator.storage.sql import SqlStore


def open_store(url: str) -> Store:
    """``memory://`` for an in-memory store, any SQLAlchemy URL otherwise."""
    if url == "memory://":
        return InMemoryStore()
    return SqlStore(url)


__all__ = [
    "BlobError",
    "Conflict",
    "FileBlobStore",
    "InMemoryStore",
    "ModelVersionRecord",
    "NotFound",
    "ParticipantRecord",
    "RoundRecord",
    "SqlStore",
    "StorageError",
    "Store",
    "TaskRecord",
    "open_store",
]
