"""Errors of the storage layer. Every method of :class:`~coordinator.storage.Store` and
:class:`~coordinator.storage.FileBlobStore` raises only these (the SQL driver's own errors
are translated, after the transaction was rolled back), except ValueError for arguments that
cannot be right, such as the model version record of another task::

    StorageError          the database or the disk failed, or refused a URL or a schema
     +-- NotFound         no such task, round, participant or model version
     +-- Conflict         the write breaks a rule: a round transition not allowed, a round
     |                    number committed twice, a second open round, a duplicate
     |                    participant, task or model version
     |    +-- Fenced      a deposed leader's write: the leader lease has a newer epoch
     +-- BlobError        a blob path escapes the store root, or a file cannot be read/written
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of the storage errors; on its own: the database is unreachable or misconfigured."""


class NotFound(StorageError):
    """The task, round, participant or model version does not exist."""


class Conflict(StorageError):
    """The write was refused because it breaks a rule of the store; nothing was written."""


class Fenced(Conflict):
    """The store is fenced with a leader lease's epoch, and the lease has moved on to
    another replica (:mod:`coordinator.storage.leases`): this process leads no more."""


class BlobError(StorageError):
    """A model file could not be written or read, or its path is not inside the store."""
