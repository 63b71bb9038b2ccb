"""Engineers' credentials: API tokens (shown once, stored as hashes) and OIDC JWTs, mapped
to a :class:`Principal` with a role; and the management of API and enrollment tokens."""

from __future__ import annotations

from collections.abc import Callable

from coordinator.security.errors import PermissionDenied, Unauthenticated, short
from coordinator.security.oidc import OidcVerifier
from coordinator.security.roles import REQUIRED_ROLE, Principal, Role
from coordinator.storage import (
    ApiTokenRecord,
    EnrollmentTokenRecord,
    NotFound,
    SecurityStore,
)
from core.security.bearer import hash_secret, matches, new_secret, parse_secret

#: The longest expiry a token may be given (10 years); 0 means never.
MAX_EXPIRY_S = 10 * 365 * 86400


def _expiry(now: float, expires_in_s: float) -> float | None:
    if expires_in_s < 0 or expires_in_s > MAX_EXPIRY_S:
        raise ValueError(f"expiry must be between 0 (never) and {MAX_EXPIRY_S} s")
    return now + expires_in_s if expires_in_s else None


class AdminAuth:
    def __init__(self, store: SecurityStore, clock: Callable[[], float],
                 oidc: OidcVerifier | None = None) -> None:
        self._store = store
        self._clock = clock
        self._oidc = oidc

    # -- requests ----------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``authorization`` header value (``Bearer <token>``)."""
        if not authorization:
            raise Unauthenticated("this call needs credentials: the metadata "
                                  "'authorization: Bearer <token>' (fedctl: --token, "
                                  "FEDCOORD_TOKEN or the token file)")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        token_id = parse_secret(credential, "fct")
        if token_id is not None:
            return self._api_token(token_id, credential)
        if self._oidc is not None and credential.count(".") == 2:
            return self._oidc.verify(credential)
        raise Unauthenticated("the bearer token is not a fedcoord API token"
                              + (" or a JWT" if self._oidc is not None else ""))

    def _api_token(self, token_id: str, secret: str) -> Principal:
        try:
            record = self._store.get_api_token(token_id)
        except NotFound:
            raise Unauthenticated("unknown API token") from None
        if not matches(secret, record.secret_hash):
            raise Unauthenticated("unknown API token")
        if record.revoked_at is not None:
            raise Unauthenticated(f"API token {token_id} was revoked")
        if record.expires_at is not None and self._clock() >= record.expires_at:
            raise Unauthenticated(f"API token {token_id} has expired")
        return Principal(f"token:{token_id}", Role.parse(record.role))

    @staticmethod
    def authorize(principal: Principal, method: str) -> None:
        required = REQUIRED_ROLE.get(method)
        if required is None:
            raise PermissionDenied(f"{short(method)} is not an admin call anyone may make")
        if principal.role < required:
            raise PermissionDenied(f"{method} needs the role {required.label} or higher; "
                                   f"{principal.actor} has {principal.role.label}")

    # -- API tokens ---------------------------------------------------------------------------

    def create_token(self, role: Role, label: str = "", expires_in_s: float = 0
                     ) -> tuple[ApiTokenRecord, str]:
        """A new API token and its secret (shown once; only its hash is kept)."""
        now = self._clock()
        fresh = new_secret("fct")
        record = ApiTokenRecord(fresh.secret_id, fresh.secret_hash, role.label, label[:200],
                                now, _expiry(now, expires_in_s))
        self._store.add_api_token(record)
        return record, fresh.secret

    def register_token(self, secret: str, role: Role, label: str = "") -> ApiTokenRecord:
        """Stores the hash of a token made elsewhere (``fedctl`` or a file the operator
        provisioned); ValueError if it is not a well-formed API token."""
        token_id = parse_secret(secret, "fct")
        if token_id is None:
            raise ValueError("not a fedcoord API token (fct_<id>_<secret>)")
        record = ApiTokenRecord(token_id, hash_secret(secret), role.label, label[:200],
                                self._clock())
        self._store.add_api_token(record)
        return record

    def list_tokens(self) -> list[ApiTokenRecord]:
        return self._store.list_api_tokens()

    def revoke_token(self, token_id: str) -> ApiTokenRecord:
        return self._store.revoke_api_token(token_id, self._clock())

    def has_admin_token(self) -> bool:
        now = self._clock()
        return any(t.role == Role.ADMIN.label and t.revoked_at is None
                   and (t.expires_at is None or t.expires_at > now)
                   for t in self._store.list_api_tokens())

    # -- enrollment tokens -----------------------------------------------------------------------

    def create_enrollment_token(self, max_devices: int, expires_in_s: float = 0,
                                label: str = "") -> tuple[EnrollmentTokenRecord, str]:
        if not 1 <= max_devices <= 1_000_000:
            raise ValueError("an enrollment token admits between 1 and 1000000 devices")
        now = self._clock()
        fresh = new_secret("fce")
        record = EnrollmentTokenRecord(fresh.secret_id, fresh.secret_hash, max_devices, 0, now,
                                       _expiry(now, expires_in_s), label[:200])
        self._store.add_enrollment_token(record)
        return record, fresh.secret
