"""Masks expanded from a seed with AES-256-CTR (a cryptographic PRG).

The protocol works in the ring Z_(2^32) or Z_(2^64): numpy's unsigned arithmetic wraps
exactly there, so adding and removing masks needs no reduction step. ``expand_mask`` keeps
the older Z_(2^b) form for any b (the low b bits of each 64-bit word).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from core.secagg.errors import SecAggError

U64 = npt.NDArray[np.uint64]
RingVector = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]
_ZERO_IV = b"\0" * 16


def ring_dtype(ring_bits: int) -> type[np.unsignedinteger]:
    if ring_bits == 32:
        return np.uint32
    if ring_bits == 64:
        return np.uint64
    raise SecAggError(f"the ring is Z_(2^32) or Z_(2^64), not Z_(2^{ring_bits})")


def prg(seed: bytes, length: int, ring_bits: int) -> RingVector:
    """``length`` uniform elements of Z_(2^ring_bits), deterministic in the 32-byte seed.
    Each seed must be used for one mask only (the counter starts at zero)."""
    if len(seed) != 32:
        raise SecAggError(f"a mask seed is 32 bytes, got {len(seed)}")
    dtype = ring_dtype(ring_bits)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    stream = encryptor.update(bytes(length * np.dtype(dtype).itemsize))
    return np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype,
                                                                                 copy=False)


class PrgStream:
    """Expands seeds into one reusable buffer (``cryptography``'s update_into), about 3x
    faster than allocating a fresh stream per mask. The returned view is valid until the
    next call; add it into an accumulator straight away."""

    def __init__(self, length: int, ring_bits: int) -> None:
        self._dtype = np.dtype(ring_dtype(ring_bits)).newbyteorder("<")
        self._length = length
        nbytes = length * self._dtype.itemsize
        self._zeros = bytes(nbytes)
        self._buffer = bytearray(nbytes + 15)  # update_into wants block_size - 1 spare bytes

    def expand(self, seed: bytes) -> RingVector:
        if len(seed) != 32:
            raise SecAggError(f"a mask seed is 32 bytes, got {len(seed)}")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return np.frombuffer(self._buffer, dtype=self._dtype, count=self._length)


def expand_mask(seed: bytes, length: int, *, bits: int) -> U64:
    """``length`` pseudo-random elements of Z_(2^bits) from a 32-byte seed (deterministic)."""
    if not 1 <= bits <= 64:
        raise SecAggError(f"bits must be in [1, 64], got {bits}")
    values = prg(seed, length, 64).astype(np.uint64)
    return values & np.uint64((1 << bits) - 1) if bits < 64 else values


def add_mod(a: U64, b: U64, bits: int) -> U64:
    s = a + b  # uint64 wraps mod 2^64, so reducing mod 2^bits afterwards is exact
    return s & np.uint64((1 << bits) - 1) if bits < 64 else s


def sub_mod(a: U64, b: U64, bits: int) -> U64:
    d = a - b
    return d & np.uint64((1 << bits) - 1) if bits < 64 else d
