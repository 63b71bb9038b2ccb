"""Errors of the storage layer.

StorageError              the database or the blob store failed, or refused a URL/schema
 +-- NotFound             no such task, round, participant or model version
 +-- Conflict             the write breaks a rule: a transition not allowed, a round number
 |                        committed twice, a duplicate participant
 +-- BlobError            a blob path escapes the store, or a file cannot be written/read
"""

from __future__ import annotations


class StorageError(Exception):
    pass


class NotFound(StorageError):
    pass


class Conflict(StorageError):
    pass


class BlobError(StorageError):
    pass
