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
from coordinator.storage.errors import Conflict


class Security:
    def __init__(self, store: SecurityStore, settings: SecuritySettings | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or SecuritySettings()
        self.audit = AuditLog(store, clock)
        self.devices = DeviceGate(store, self.settings, self.audit, clock)
        oidc = OidcVerifier(self.settings.oidc) if self.settings.oidc is not None else None
        self.admin = AdminAuth(store, clock, oidc)

    def bootstrap_admin_token(self, path: Path) -> bool:
        """The first admin token, when no admin token is usable: the one in ``path`` if that
        file exists (it must be readable by its owner only; only its hash is stored), else a
        new one written there (mode 0600) for the operator to read once, e.g.
        ``FEDCOORD_TOKEN=$(cat PATH)``. True if a token was registered; False also when
        another replica registered the same file's token at the same moment."""
        if self.admin.has_admin_token():
            return False
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise ValueError(f"{path}: an admin token file must be readable by its owner "
                                 f"only (mode {mode:o}; chmod 600 it)")
            try:
                record = self.admin.register_token(path.read_text().strip(), Role.ADMIN,
                                                   label="bootstrap")
            except Conflict:
                # Replicas started together from one token file: another registered it
                # between the check above and this write.
                if self.admin.has_admin_token():
                    return False
                raise
            how = f"read from {path}"
        else:
            record, secret = self.admin.create_token(Role.ADMIN, label="bootstrap")
            write_secret_file(path, secret)
            how = f"written to {path}"
        self.audit.record("local:coordinator", "CreateToken", record.token_id, "ok",
                          f"bootstrap admin token {how}")
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
