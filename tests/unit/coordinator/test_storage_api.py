"""The public surface of coordinator.storage: what other packages may import, pinned."""

from __future__ import annotations

from pathlib import Path

import coordinator.storage as storage
from coordinator.storage import (
    BlobError,
    Conflict,
    InMemoryStore,
    NotFound,
    SqlStore,
    StorageError,
    Store,
    open_store,
)


def test_the_public_names_are_exactly_these() -> None:
    assert sorted(storage.__all__) == sorted(
        [
            "ROUND_TRANSITIONS",
            "ApiTokenRecord",
            "AuditRecord",
            "BlobError",
            "DeviceRecord",
            "EnrollmentTokenRecord",
            "InMemorySecurityStore",
            "SecurityStore",
            "open_security_store",
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
    )
    assert all(hasattr(storage, name) for name in storage.__all__)


def test_every_storage_error_derives_from_storage_error() -> None:
    for error in (NotFound, Conflict, BlobError):
        assert issubclass(error, StorageError)
    assert issubclass(StorageError, Exception)


def test_open_store_memory_url_is_an_in_memory_store() -> None:
    store = open_store("memory://")

    assert isinstance(store, InMemoryStore)
    assert isinstance(store, Store)


def test_open_store_any_other_url_is_a_sql_store(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'coordinator.db'}")
    try:
        assert isinstance(store, SqlStore)
        assert store.list_tasks() == []
    finally:
        store.close()
