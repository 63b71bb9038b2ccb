"""Masks expanded from a seed with AES-256-CTR (a cryptographic PRG), as vectors in Z_(2^b)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from core.errors import CoreError

U64 = npt.NDArray[np.uint64]


def expand_mask(seed: bytes, length: int, *, bits: int) -> U64:
    """``length`` pseudo-random elements of Z_(2^bits) from a 32-byte seed (deterministic)."""
    if len(seed) != 32:
        raise CoreError(f"a mask seed is 32 bytes, got {len(seed)}")
    if not 1 <= bits <= 64:
        raise CoreError(f"bits must be in [1, 64], got {bits}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (8 * length)) + encryptor.finalize()
    values = np.frombuffer(stream, dtype="<u8").astype(np.uint64)
    return values & np.uint64((1 << bits) - 1) if bits < 64 else values


def add_mod(a: U64, b: U64, bits: int) -> U64:
    s = a + b  # uint64 wraps mod 2^64, so reducing mod 2^bits afterwards is exact
    return s & np.uint64((1 << bits) - 1) if bits < 64 else s


def sub_mod(a: U64, b: U64, bits: int) -> U64:
    d = a - b
    return d & np.uint64((1 << bits) - 1) if bits < 64 else d
