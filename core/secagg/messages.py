"""The messages of one SecAgg+ round, as plain values (the wire form lives in protos/).

Participants are numbered 1..n by the server when advertisement closes; the numbers are the
Shamir x-coordinates and the nodes of the neighbour graph. Lists of pairs (not dicts) keep
duplicates visible, so a participant can refuse them.

Stages, in order (Bonawitz et al. 2017, section 4; Bell et al. 2020 for the graph):

0. advertise: each device sends two X25519 public keys and the hash of the model and round
   configuration it received.
1. share keys: the server sends each device its neighbours' keys and hashes; the device
   Shamir-shares its self-mask seed b and its mask private key among neighbours and itself,
   and returns one AES-GCM ciphertext per neighbour.
2. masked input: the server forwards the ciphertexts; the device uploads
   y = x + PRG(b) + sum over neighbours v of +-PRG(s_uv).
3. unmask: the server names, among each device's neighbours, who survived and who dropped;
   the device reveals seed shares for survivors and key shares for the dropped, never both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

RingVector = npt.NDArray[np.uint32] | npt.NDArray[np.uint64]


class Stage(enum.IntEnum):
    ADVERTISE = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    UNMASK = 3
    DONE = 4


@dataclass(frozen=True)
class KeyAdvertisement:
    """Stage 0, device -> server."""

    encryption_public: bytes
    mask_public: bytes
    config_hash: bytes


@dataclass(frozen=True)
class PeerKeys:
    index: int
    encryption_public: bytes
    mask_public: bytes
    config_hash: bytes


@dataclass(frozen=True)
class ShareKeysRequest:
    """Stage 1, server -> device: its own number and its neighbours' keys."""

    index: int
    peers: tuple[PeerKeys, ...]


@dataclass(frozen=True)
class ShareKeysResponse:
    """Stage 1, device -> server: (recipient, ciphertext of the recipient's two shares)."""

    ciphertexts: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class MaskedInputRequest:
    """Stage 2, server -> device: (sender, ciphertext) from neighbours that shared keys."""

    ciphertexts: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server -> device: among the device's neighbours (and itself), who survived
    to upload a masked input and who dropped after sharing keys."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, device -> server: (owner, share) of self-mask seeds and of mask keys."""

    seed_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]
