"""Device identity: an Ed25519 key pair per device, and the id derived from its public key.

A device proves a request is its own with a :class:`DeviceProof`: an Ed25519 signature over
:func:`signed_payload` (a purpose, the public key, the device id, the task id, a timestamp and
a fresh nonce). The coordinator checks the signature, that the id is the one derived from the
key (so no device can claim another's id), that the timestamp is within its window and that
the nonce was not seen before (:mod:`coordinator.security`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
NONCE_BYTES = 16
#: Prefix of every device id; the rest is 32 hex digits (128 bits) of sha256(public key).
DEVICE_ID_PREFIX = "dk-"
_DOMAIN = b"fedcoord/v1/device-proof"

#: What a proof may be for; bound into the signature so one purpose's proof is useless for
#: another.
PURPOSES = frozenset({"enroll", "check-in"})


class KeyFileError(ValueError):
    """A device key file that cannot be used (others may read it, or it is not a key)."""


class InvalidProof(ValueError):
    """A proof that does not verify; the message says why (never echoing unbounded input)."""


def device_id_for(public_key: bytes) -> str:
    """The device id of a public key: ``dk-`` and 32 hex digits of its sha256."""
    return DEVICE_ID_PREFIX + hashlib.sha256(public_key).hexdigest()[:32]


def signed_payload(purpose: str, public_key: bytes, device_id: str, task_id: str,
                   timestamp_ms: int, nonce: bytes) -> bytes:
    """The bytes a proof signs: length-prefixed fields after a domain tag, so no two field
    lists encode alike."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown proof purpose {purpose!r}")
    out = bytearray(_DOMAIN)
    for part in (purpose.encode(), public_key, device_id.encode(), task_id.encode(), nonce):
        out += struct.pack(">I", len(part)) + part
    out += struct.pack(">Q", timestamp_ms)
    return bytes(out)


@dataclass(frozen=True)
class DeviceProof:
    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes

    def verify(self, purpose: str, device_id: str, task_id: str) -> str:
        """Checks the signature and that ``device_id`` (if not empty) is the key's; returns
        the key's device id. Raises InvalidProof."""
        if len(self.public_key) != PUBLIC_KEY_BYTES:
            raise InvalidProof(f"the proof's public key must be {PUBLIC_KEY_BYTES} bytes "
                               f"(Ed25519), got {len(self.public_key)}")
        if len(self.nonce) != NONCE_BYTES:
            raise InvalidProof(f"the proof's nonce must be {NONCE_BYTES} bytes, "
                               f"got {len(self.nonce)}")
        if len(self.signature) != SIGNATURE_BYTES:
            raise InvalidProof(f"the proof's signature must be {SIGNATURE_BYTES} bytes, "
                               f"got {len(self.signature)}")
        own_id = device_id_for(self.public_key)
        if device_id and not secrets.compare_digest(device_id.encode(), own_id.encode()):
            raise InvalidProof("the device id is not the one derived from the proof's public "
                               f"key (that would be {own_id})")
        payload = signed_payload(purpose, self.public_key, own_id, task_id,
                                 self.timestamp_ms, self.nonce)
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(self.signature, payload)
        except (InvalidSignature, ValueError):
            raise InvalidProof("the proof's signature does not verify") from None
        return own_id


class DeviceKey:
    """A device's Ed25519 key pair."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.device_id = device_id_for(self.public_key)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> DeviceKey:
        """The key stored at ``path`` (raw 32-byte seed), created with mode 0600 on first use.
        Raises KeyFileError for a file that is not a key or that others may read."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls._load(path)
        key = Ed25519PrivateKey.generate()
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.Raw,
                                      serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()))
        return cls(key)

    @classmethod
    def _load(cls, path: Path) -> DeviceKey:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{path}: a device key must be readable by its owner only "
                             f"(mode {mode:o}; chmod 600 it)")
        seed = path.read_bytes()
        if len(seed) != 32:
            raise KeyFileError(f"{path}: not a device key (expected 32 bytes, found "
                               f"{len(seed)})")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def prove(self, purpose: str, task_id: str = "", *, timestamp_ms: int | None = None,
              nonce: bytes | None = None) -> DeviceProof:
        """A fresh proof for one request."""
        ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        nonce = secrets.token_bytes(NONCE_BYTES) if nonce is None else nonce
        payload = signed_payload(purpose, self.public_key, self.device_id, task_id, ts, nonce)
        return DeviceProof(self.public_key, ts, nonce, self._key.sign(payload))
