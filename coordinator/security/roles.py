"""Roles of the admin API, each including the ones below it, and the role every admin RPC
needs. An RPC missing from :data:`REQUIRED_ROLE` is refused to everyone (fail closed)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class Role(enum.IntEnum):
    VIEWER = 1    # read tasks, rounds, models
    LAUNCHER = 2  # + launch and cancel tasks
    ADMIN = 3     # + tokens, devices, enrollment, the audit log

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {name[:20]!r}: expected viewer, launcher or "
                             "admin") from None


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: ``token:<id>``, ``oidc:<subject>`` or ``local:<user>``."""

    actor: str
    role: Role


REQUIRED_ROLE: Mapping[str, Role] = MappingProxyType({
    "GetTask": Role.VIEWER,
    "ListTasks": Role.VIEWER,
    "ListRounds": Role.VIEWER,
    "DownloadModel": Role.VIEWER,
    "ListEvents": Role.VIEWER,
    "WhoAmI": Role.VIEWER,
    "CreateTask": Role.LAUNCHER,
    "CancelTask": Role.LAUNCHER,
    "CreateToken": Role.ADMIN,
    "ListTokens": Role.ADMIN,
    "RevokeToken": Role.ADMIN,
    "CreateEnrollmentToken": Role.ADMIN,
    "ListDevices": Role.ADMIN,
    "RevokeDevice": Role.ADMIN,
    "ListAudit": Role.ADMIN,
})

#: Admin RPCs whose successes are written to the audit log (every refusal is written).
AUDITED = frozenset({"CreateTask", "CancelTask", "DownloadModel", "CreateToken", "RevokeToken",
                     "CreateEnrollmentToken", "RevokeDevice"})
