"""Key agreement (X25519 + HKDF-SHA256) and authenticated encryption (AES-256-GCM) for the
shares that travel between devices through the coordinator."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.secagg.errors import SecAggError

PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12


class CryptoError(SecAggError):
    """A public key of the wrong size, or a ciphertext that fails authentication."""


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    return private, public


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != 32:
        raise CryptoError(f"an X25519 private key is 32 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey, peer_public: bytes, *, context: bytes) -> bytes:
    """A 32-byte key shared by both ends, bound to ``context`` (e.g. task, round, purpose)."""
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise CryptoError(f"a public key is {PUBLIC_KEY_BYTES} bytes, got {len(peer_public)}")
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    """Raises CryptoError if the ciphertext or its associated data was tampered with."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise CryptoError("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except InvalidTag:
        raise CryptoError("ciphertext failed authentication (tampered or wrong key)") from None
