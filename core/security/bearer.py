"""Bearer secrets (API tokens, enrollment tokens): random, shown once, stored as a hash.

A secret is ``<kind>_<id>_<random>``; the id part lets the store find the row without
scanning and the hash of the whole secret proves it. Secrets carry 256 bits of randomness,
so a fast hash (sha256) is enough; comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets as _secrets
from dataclasses import dataclass

_SECRET = re.compile(r"^(fct|fce)_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True)
class NewSecret:
    secret_id: str
    secret: str
    secret_hash: str


def new_secret(kind: str) -> NewSecret:
    """``kind``: ``fct`` (an API token) or ``fce`` (an enrollment token)."""
    if kind not in ("fct", "fce"):
        raise ValueError(f"unknown secret kind {kind!r}")
    secret_id = _secrets.token_hex(6)
    secret = f"{kind}_{secret_id}_{_secrets.token_urlsafe(32)}"
    return NewSecret(secret_id, secret, hash_secret(secret))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_secret(secret: str, kind: str) -> str | None:
    """The id part of a well-formed secret of ``kind``, or None."""
    m = _SECRET.match(secret)
    if m is None or m.group(1) != kind:
        return None
    return m.group(2)


def matches(secret: str, secret_hash: str) -> bool:
    """Constant-time: does ``secret`` hash to ``secret_hash``?"""
    return hmac.compare_digest(hash_secret(secret), secret_hash)
