"""Persistence of the coordinator: tasks, round attempts, participants and model versions in
a database behind :class:`Store`, and model files in a :class:`FileBlobStore`.

The names below are the public surface (pinned by tests/unit/coordinator/test_storage_api.py);
the modules behind them are an implementation detail.
"""

from coordinator.storage.base import ROUND_TRANSITIONS, Store
from coordinator.storage.blobs import FileBlobStore
from coordinator.storage.errors import BlobError, Conflict, NotFound, StorageError
from coordinator.storage.memory import InMemoryStore
from coordinator.storage.records import (
    ModelVersionRecord,
    ParticipantRecord,
    RoundRecord,
    TaskRecord,
)
from coordinator.storage.security import (
    ApiTokenRecord,
    AuditRecord,
    DeviceRecord,
    EnrollmentTokenRecord,
    InMemorySecurityStore,
    SecurityStore,
)
from coordinator.storage.sql import SqlStore


def open_store(url: str) -> Store:
    """``memory://``: an :class:`InMemoryStore`; any other URL: a :class:`SqlStore` on that
    SQLAlchemy URL (raises StorageError if it cannot be opened)."""
    if url == "memory://":
        return InMemoryStore()
    return SqlStore(url)


def open_security_store(store: Store) -> SecurityStore:
    """The security records beside ``store``: in its database for a :class:`SqlStore`,
    in memory otherwise."""
    if isinstance(store, SqlStore):
        return store.security_store()
    return InMemorySecurityStore()


__all__ = [
    "ROUND_TRANSITIONS",
    "ApiTokenRecord",
    "AuditRecord",
    "DeviceRecord",
    "EnrollmentTokenRecord",
    "InMemorySecurityStore",
    "SecurityStore",
    "open_security_store",
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
