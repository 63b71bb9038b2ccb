"""How a coordinator admits devices and engineers, and its abuse limits."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from core.security.ratelimit import Rate


class EnrollmentPolicy(enum.Enum):
    #: Any key enrolls (simulations, demos, closed networks).
    OPEN = "open"
    #: A key enrolls with an enrollment token (``fedctl devices enroll --count N``).
    TOKEN = "token"
    #: Only the keys (or device ids) listed in a file enroll.
    ALLOW_LIST = "allow-list"


@dataclass(frozen=True)
class OidcSettings:
    """JWTs of one issuer, verified against its JWKS (a file: the coordinator fetches
    nothing), with the role in ``role_claim``."""

    issuer: str
    audience: str
    jwks_file: Path
    role_claim: str = "fedcoord_role"


@dataclass(frozen=True)
class SecuritySettings:
    enrollment: EnrollmentPolicy = EnrollmentPolicy.OPEN
    #: The allow-list policy's file: one Ed25519 public key (64 hex digits) or device id
    #: (``dk-...``) per line; ``#`` starts a comment.
    allow_list: Path | None = None
    #: ``module:function`` called for every new enrollment (see coordinator.security.devices).
    attestation_hook: str | None = None
    #: A device proof's timestamp may differ from the coordinator's clock by this much.
    proof_window_s: float = 60.0
    checkin_per_device: Rate = field(default_factory=lambda: Rate(per_second=2.0, burst=10))
    checkin_per_peer: Rate = field(default_factory=lambda: Rate(per_second=500.0, burst=1000))
    enroll_per_peer: Rate = field(default_factory=lambda: Rate(per_second=20.0, burst=200))
    #: Uploads and downloads in flight from one peer address at a time.
    max_streams_per_peer: int = 64
    oidc: OidcSettings | None = None
    #: Admin calls without credentials act as an anonymous admin (transitional: off once
    #: every client sends tokens).
    admin_auth: bool = False
