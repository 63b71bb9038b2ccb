"""OIDC bearer tokens: JWTs from one issuer, verified with pyjwt against the issuer's JWKS
(read from a file the operator keeps current), with the role in a claim."""

from __future__ import annotations

import json
from typing import Any

import jwt

from coordinator.security.errors import PermissionDenied, Unauthenticated
from coordinator.security.roles import Principal, Role
from coordinator.settings import OidcSettings

_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"]


class OidcVerifier:
    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        try:
            self._keys = jwt.PyJWKSet.from_json(settings.jwks_file.read_text())
        except (OSError, json.JSONDecodeError, jwt.PyJWTError) as exc:
            raise ValueError(f"{settings.jwks_file}: not a readable JWKS ({exc})") from None

    def verify(self, token: str) -> Principal:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._key(kid)
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=_ALGORITHMS, audience=self.settings.audience,
                issuer=self.settings.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the bearer JWT was refused: {type(exc).__name__}") from None
        role = claims.get(self.settings.role_claim)
        if not isinstance(role, str):
            raise PermissionDenied(f"the JWT has no {self.settings.role_claim!r} claim naming "
                                   "a role (viewer, launcher or admin)")
        try:
            parsed = Role.parse(role)
        except ValueError as exc:
            raise PermissionDenied(str(exc)) from None
        return Principal(f"oidc:{str(claims['sub'])[:64]}", parsed)

    def _key(self, kid: object) -> Any:
        for key in self._keys.keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise jwt.InvalidKeyError("no key of the JWKS has the token's kid")
