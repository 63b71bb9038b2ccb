"""The security layer as one object the composition root builds and the servicers call."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.security.admin import AdminAuth
from coordinator.security.audit import AuditLog
from coordinator.security.devices import DeviceGate
from coordinator.security.oidc import OidcVerifier
from coordinator.security.roles import Role
from coordinator.settings import SecuritySettings
from coordinator.storage import SecurityStore


class Security:
    def __init__(self, store: SecurityStore, settings: SecuritySettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or SecuritySettings()
        self.audit = AuditLog(store, clock)
        self.devices = DeviceGate(store, self.settings, self.audit, clock)
        oidc = OidcVerifier(self.settings.oidc) if self.settings.oidc is not None else None
        self.admin = AdminAuth(store, clock, oidc)

    def bootstrap_admin_token(self, path: Path) -> bool:
        """When no admin token is usable, creates one and writes its secret to ``path``
        (mode 0600, replacing the file); True if it did. The operator reads it once, e.g.
        ``FEDCOORD_TOKEN=$(cat PATH)``."""
        if self.admin.has_admin_token():
            return False
        record, secret = self.admin.create_token(Role.ADMIN, label="bootstrap")
        write_secret_file(path, secret)
        self.audit.record("local:coordinator", "CreateToken", record.token_id, "ok",
                          f"bootstrap admin token written to {path}")
        return True


def write_secret_file(path: Path, secret: str) -> None:
    """Writes ``secret`` to a file only its owner can read, created with that mode (never
    readable by others, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)
