"""What the coordinator keeps for security: enrolled device keys, enrollment tokens, API
tokens (their hashes only) and the audit log, behind :class:`SecurityStore`.

Same rules as :class:`~coordinator.storage.base.Store`: every method is atomic, records are
frozen snapshots, times are Unix seconds given by the caller; NotFound for unknown ids,
Conflict for refused writes. One contract test suite runs against every implementation
(tests/contract/test_security_store_contract.py).
"""

from __future__ import annotations

import abc
import itertools
import threading
from dataclasses import dataclass, replace

from coordinator.storage.errors import Conflict, NotFound


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    public_key: bytes
    enrolled_at: float
    #: The enrollment token that admitted the key ("" under the open or allow-list policy).
    enrollment_token_id: str
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class EnrollmentTokenRecord:
    token_id: str
    secret_hash: str
    max_devices: int
    used: int
    created_at: float
    expires_at: float | None
    label: str = ""


@dataclass(frozen=True)
class ApiTokenRecord:
    token_id: str
    secret_hash: str
    role: str
    label: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None


@dataclass(frozen=True)
class AuditRecord:
    entry_id: int
    at: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str


class SecurityStore(abc.ABC):
    # -- devices -----------------------------------------------------------------------

    @abc.abstractmethod
    def enroll_device(self, device_id: str, public_key: bytes, now: float,
                      enrollment_token_id: str = "") -> tuple[DeviceRecord, bool]:
        """Enrolls the key, or returns its existing record (``(record, False)``; a repeated
        enrollment uses no token). With ``enrollment_token_id`` the token's use count goes up
        by one in the same transaction: NotFound if there is no such token, Conflict if it
        has expired (at ``now``) or enrolled ``max_devices`` keys already. Conflict if the
        id is enrolled with another public key."""

    @abc.abstractmethod
    def get_device(self, device_id: str) -> DeviceRecord:
        """NotFound if the device never enrolled."""

    @abc.abstractmethod
    def list_devices(self) -> list[DeviceRecord]:
        """By enrollment time, then id."""

    @abc.abstractmethod
    def revoke_device(self, device_id: str, now: float) -> DeviceRecord:
        """Sets ``revoked_at`` (kept if already revoked). NotFound if never enrolled."""

    # -- enrollment tokens ---------------------------------------------------------------

    @abc.abstractmethod
    def add_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        """Conflict if the id exists."""

    @abc.abstractmethod
    def get_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord:
        """NotFound if there is no such token."""

    # -- API tokens ------------------------------------------------------------------------

    @abc.abstractmethod
    def add_api_token(self, token: ApiTokenRecord) -> None:
        """Conflict if the id exists."""

    @abc.abstractmethod
    def get_api_token(self, token_id: str) -> ApiTokenRecord:
        """NotFound if there is no such token."""

    @abc.abstractmethod
    def list_api_tokens(self) -> list[ApiTokenRecord]:
        """By creation time, then id."""

    @abc.abstractmethod
    def revoke_api_token(self, token_id: str, now: float) -> ApiTokenRecord:
        """Sets ``revoked_at`` (kept if already revoked). NotFound if there is no such
        token."""

    # -- audit -------------------------------------------------------------------------------

    @abc.abstractmethod
    def append_audit(self, at: float, actor: str, action: str, target: str, outcome: str,
                     detail: str = "") -> AuditRecord:
        """Appends one entry; ids increase in order of appending."""

    @abc.abstractmethod
    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` entries, newest first."""


def check_token_usable(token: EnrollmentTokenRecord, now: float) -> None:
    """Conflict unless the token can enroll one more key at ``now``."""
    if token.expires_at is not None and now >= token.expires_at:
        raise Conflict(f"enrollment token {token.token_id} has expired")
    if token.used >= token.max_devices:
        raise Conflict(f"enrollment token {token.token_id} has enrolled its "
                       f"{token.max_devices} device(s) already")


class InMemorySecurityStore(SecurityStore):
    """Thread-safe (one lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self._enrollment: dict[str, EnrollmentTokenRecord] = {}
        self._api: dict[str, ApiTokenRecord] = {}
        self._audit: list[AuditRecord] = []
        self._ids = itertools.count(1)

    def enroll_device(self, device_id: str, public_key: bytes, now: float,
                      enrollment_token_id: str = "") -> tuple[DeviceRecord, bool]:
        with self._lock:
            existing = self._devices.get(device_id)
            if existing is not None:
                if existing.public_key != public_key:
                    raise Conflict(f"device {device_id} is enrolled with another key")
                return existing, False
            if enrollment_token_id:
                token = self._enrollment.get(enrollment_token_id)
                if token is None:
                    raise NotFound(f"no enrollment token {enrollment_token_id}")
                check_token_usable(token, now)
                self._enrollment[token.token_id] = replace(token, used=token.used + 1)
            record = DeviceRecord(device_id, bytes(public_key), now, enrollment_token_id)
            self._devices[device_id] = record
            return record, True

    def get_device(self, device_id: str) -> DeviceRecord:
        with self._lock:
            try:
                return self._devices[device_id]
            except KeyError:
                raise NotFound(f"no enrolled device {device_id}") from None

    def list_devices(self) -> list[DeviceRecord]:
        with self._lock:
            return sorted(self._devices.values(), key=lambda d: (d.enrolled_at, d.device_id))

    def revoke_device(self, device_id: str, now: float) -> DeviceRecord:
        with self._lock:
            record = self._devices.get(device_id)
            if record is None:
                raise NotFound(f"no enrolled device {device_id}")
            if record.revoked_at is None:
                record = self._devices[device_id] = replace(record, revoked_at=now)
            return record

    def add_enrollment_token(self, token: EnrollmentTokenRecord) -> None:
        with self._lock:
            if token.token_id in self._enrollment:
                raise Conflict(f"enrollment token {token.token_id} exists")
            self._enrollment[token.token_id] = token

    def get_enrollment_token(self, token_id: str) -> EnrollmentTokenRecord:
        with self._lock:
            try:
                return self._enrollment[token_id]
            except KeyError:
                raise NotFound(f"no enrollment token {token_id}") from None

    def add_api_token(self, token: ApiTokenRecord) -> None:
        with self._lock:
            if token.token_id in self._api:
                raise Conflict(f"API token {token.token_id} exists")
            self._api[token.token_id] = token

    def get_api_token(self, token_id: str) -> ApiTokenRecord:
        with self._lock:
            try:
                return self._api[token_id]
            except KeyError:
                raise NotFound(f"no API token {token_id}") from None

    def list_api_tokens(self) -> list[ApiTokenRecord]:
        with self._lock:
            return sorted(self._api.values(), key=lambda t: (t.created_at, t.token_id))

    def revoke_api_token(self, token_id: str, now: float) -> ApiTokenRecord:
        with self._lock:
            record = self._api.get(token_id)
            if record is None:
                raise NotFound(f"no API token {token_id}")
            if record.revoked_at is None:
                record = self._api[token_id] = replace(record, revoked_at=now)
            return record

    def append_audit(self, at: float, actor: str, action: str, target: str, outcome: str,
                     detail: str = "") -> AuditRecord:
        with self._lock:
            entry = AuditRecord(next(self._ids), at, actor, action, target, outcome, detail)
            self._audit.append(entry)
            return entry

    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        with self._lock:
            return list(reversed(self._audit[-limit:])) if limit > 0 else []
