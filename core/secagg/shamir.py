"""Shamir t-of-n secret sharing of byte strings (up to 64 bytes) over the prime field
GF(2^521 - 1).

Share ids are the x-coordinates, distinct integers in [1, 2^32). ``combine`` with more than
``threshold`` shares also checks that every share lies on the same polynomial, so a tampered
share is detected instead of silently giving a wrong secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from core.errors import CoreError

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64


class ShamirError(CoreError):
    """Too few shares, inconsistent (tampered) shares, or bad parameters."""


def split(secret: bytes, *, threshold: int, share_ids: Sequence[int]) -> dict[int, int]:
    """Shares of ``secret``: any ``threshold`` of them reconstruct it, fewer reveal nothing.
    Coefficients come from the OS CSPRNG."""
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ShamirError(f"secret must be 1-{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    ids = list(share_ids)
    _check_ids(ids)
    if not 1 <= threshold <= len(ids):
        raise ShamirError(f"threshold {threshold} must be between 1 and {len(ids)} shares")
    # A leading 0x01 keeps leading zero bytes of the secret through the int round trip.
    coeffs = [int.from_bytes(b"\x01" + secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return {x: _eval(coeffs, x) for x in ids}


def combine(shares: Mapping[int, int], *, threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares; ShamirError if too few or inconsistent."""
    ids = list(shares)
    _check_ids(ids)
    if len(ids) < threshold:
        raise ShamirError(f"{len(ids)} shares cannot reconstruct a {threshold}-of-n secret")
    base = ids[:threshold]
    for x in ids[threshold:]:
        if _interpolate({i: shares[i] for i in base}, x) != shares[x] % PRIME:
            raise ShamirError(f"share {x} is inconsistent with the others (tampered?)")
    value = _interpolate({i: shares[i] for i in base}, 0)
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) - 1 > MAX_SECRET_BYTES:
        raise ShamirError("shares do not encode a secret (tampered, or too few)")
    return raw[1:]


def _check_ids(ids: list[int]) -> None:
    if len(set(ids)) != len(ids):
        raise ShamirError("share ids must be distinct")
    if any(not 0 < x < 2**32 for x in ids):
        raise ShamirError("share ids must be in [1, 2^32)")


def _eval(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _interpolate(points: Mapping[int, int], at: int) -> int:
    """Lagrange interpolation of the polynomial through ``points``, evaluated at ``at``."""
    total = 0
    xs = list(points)
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (at - j) % PRIME
                den = den * (i - j) % PRIME
        total = (total + points[i] * num * pow(den, -1, PRIME)) % PRIME
    return total
