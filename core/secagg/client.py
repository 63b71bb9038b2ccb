"""The device's side of a SecAgg+ round: a state machine that checks everything the server
sends and refuses (SecAggRefused) rather than leak.

Defences against a server that deviates: the stages must come in order, once each; a peer
must appear once, never be the device itself, carry 32-byte keys and the same model and
configuration hash as the device; ciphertexts must authenticate and name the right sender
and recipient; in the unmask stage the survivor and dropped lists must be disjoint, name only
neighbours that shared keys (and the device itself as a survivor), cover all of them, and
leave at least t survivors. So a device never reveals both shares of one peer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np

from core.secagg import keys, shamir
from core.secagg.errors import SecAggError
from core.secagg.errors import SecAggRefused as SecAggRefused  # re-exported: its old home
from core.secagg.masks import PrgStream
from core.secagg.messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    PeerKeys,
    RingVector,
    ShareKeysRequest,
    ShareKeysResponse,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from core.secagg.params import SecAggParams

SECRET_BYTES = 32
_PAIR = struct.Struct(">II")


def pair_context(context: bytes, purpose: bytes, u: int, v: int) -> bytes:
    lo, hi = min(u, v), max(u, v)
    return context + b"/" + purpose + b"/" + _PAIR.pack(lo, hi)


def share_associated_data(context: bytes, sender: int, recipient: int) -> bytes:
    return context + b"/share/" + _PAIR.pack(sender, recipient)


def mask_sign(own: int, peer: int) -> int:
    """+1 if ``own`` adds the pairwise mask it shares with ``peer``, -1 if it subtracts it."""
    return 1 if own < peer else -1


class SecAggClient:
    def __init__(self, params: SecAggParams, context: bytes, config_hash: bytes) -> None:
        self.params = params
        self._context = context
        self._config_hash = config_hash
        self._enc_private, self._enc_public = keys.generate_keypair()
        self._mask_private, self._mask_public = keys.generate_keypair()
        self._seed = os.urandom(SECRET_BYTES)
        self.stage = Stage.ADVERTISE
        self.index = 0
        self._peers: dict[int, PeerKeys] = {}
        self._box_keys: dict[int, bytes] = {}  # encryption keys shared with each neighbour
        self._alive: set[int] = set()  # neighbours whose shares this device holds
        self._seed_shares: dict[int, bytes] = {}
        self._key_shares: dict[int, bytes] = {}

    # ---------------------------------------------------------------- stage 0

    def advertise(self) -> KeyAdvertisement:
        self._enter(Stage.ADVERTISE)
        return KeyAdvertisement(self._enc_public, self._mask_public, self._config_hash)

    # ---------------------------------------------------------------- stage 1

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysResponse:
        self._enter(Stage.SHARE_KEYS)
        if not 1 <= request.index < shamir.PRIME:
            raise SecAggRefused(f"participant number {request.index} is out of range")
        self.index = request.index
        peers: dict[int, PeerKeys] = {}
        seen_keys = {self._enc_public, self._mask_public}
        for peer in request.peers:
            self._check_peer(peer, peers, seen_keys)
            peers[peer.index] = peer
        if len(peers) > self.params.neighbours:
            raise SecAggRefused(f"{len(peers)} neighbours sent, at most "
                                f"{self.params.neighbours} expected")
        if len(peers) + 1 < self.params.threshold:
            raise SecAggRefused(f"{len(peers)} neighbours cannot hold a "
                                f"{self.params.threshold}-of-n sharing")
        self._peers = peers
        holders = [self.index, *peers]
        seed_shares = shamir.split(self._seed, threshold=self.params.threshold,
                                   share_ids=holders)
        key_shares = shamir.split(keys.private_bytes(self._mask_private),
                                  threshold=self.params.threshold, share_ids=holders)
        self._seed_shares[self.index] = seed_shares[self.index]
        self._key_shares[self.index] = key_shares[self.index]
        out = []
        for v, peer in peers.items():
            key = self._box_keys[v] = keys.agree(
                self._enc_private, peer.encryption_public,
                context=pair_context(self._context, b"enc", self.index, v))
            plaintext = _PAIR.pack(self.index, v) + seed_shares[v] + key_shares[v]
            out.append((v, keys.encrypt(key, plaintext, associated=share_associated_data(
                self._context, self.index, v))))
        return ShareKeysResponse(tuple(out))

    def _check_peer(self, peer: PeerKeys, peers: dict[int, PeerKeys], seen: set[bytes]) -> None:
        if peer.index == self.index:
            raise SecAggRefused("the device itself is listed as its own neighbour")
        if peer.index in peers:
            raise SecAggRefused(f"neighbour {peer.index} is listed twice")
        if not 1 <= peer.index < shamir.PRIME:
            raise SecAggRefused(f"neighbour number {peer.index} is out of range")
        for what, key in (("encryption", peer.encryption_public), ("mask", peer.mask_public)):
            if len(key) != keys.PUBLIC_KEY_BYTES:
                raise SecAggRefused(f"neighbour {peer.index}'s {what} key is {len(key)} bytes, "
                                    f"not {keys.PUBLIC_KEY_BYTES}")
            if key in seen:
                raise SecAggRefused(f"neighbour {peer.index}'s {what} key repeats another key")
            seen.add(key)
        if peer.config_hash != self._config_hash:
            raise SecAggRefused(
                f"neighbour {peer.index} received a different model or round configuration "
                "(hash mismatch): the server is not sending everyone the same model"
            )

    # ---------------------------------------------------------------- stage 2

    def mask(self, request: MaskedInputRequest, vector: RingVector) -> RingVector:
        """``vector`` (already quantized into the ring) plus this device's masks."""
        self._enter(Stage.MASKED_INPUT)
        for sender, ciphertext in request.ciphertexts:
            if sender not in self._peers:
                raise SecAggRefused(f"shares from {sender}, who is not a neighbour")
            if sender in self._alive:
                raise SecAggRefused(f"shares from neighbour {sender} sent twice")
            try:
                plaintext = keys.decrypt(self._box_keys[sender], ciphertext, associated=share_associated_data(
                    self._context, sender, self.index))
            except keys.CryptoError as exc:
                raise SecAggRefused(f"shares from neighbour {sender}: {exc}") from None
            share_len = (len(plaintext) - _PAIR.size) // 2
            if _PAIR.unpack(plaintext[:_PAIR.size]) != (sender, self.index) or share_len != (
                len(self._seed_shares[self.index])
            ):
                raise SecAggRefused(f"shares from neighbour {sender} are malformed")
            body = plaintext[_PAIR.size:]
            self._seed_shares[sender] = body[:share_len]
            self._key_shares[sender] = body[share_len:]
            self._alive.add(sender)
        if len(self._alive) + 1 < self.params.threshold:
            raise SecAggRefused(f"only {len(self._alive)} neighbours shared keys; "
                                f"{self.params.threshold - 1} are needed")
        dtype = np.uint32 if self.params.ring_bits == 32 else np.uint64
        if vector.dtype != dtype:
            raise SecAggError(f"the input must be {np.dtype(dtype).name} for this ring")
        out = vector.copy()
        stream = PrgStream(len(out), self.params.ring_bits)
        out += stream.expand(self._seed)
        for v in sorted(self._alive):
            seed = keys.agree(self._mask_private, self._peers[v].mask_public,
                              context=pair_context(self._context, b"mask", self.index, v))
            if mask_sign(self.index, v) > 0:
                out += stream.expand(seed)
            else:
                out -= stream.expand(seed)
        return out

    # ---------------------------------------------------------------- stage 3

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        self._enter(Stage.UNMASK)
        survivors = _unique(request.survivors, "survivor")
        dropped = _unique(request.dropped, "dropped")
        if survivors & dropped:
            raise SecAggRefused(f"peers {sorted(survivors & dropped)[:5]} are listed both as "
                                "survivors and as dropped: revealing both shares would "
                                "unmask them")
        if self.index in dropped or self.index not in survivors:
            raise SecAggRefused("this device is alive but is not listed as a survivor")
        known = self._alive | {self.index}
        unknown = (survivors | dropped) - known
        if unknown:
            raise SecAggRefused(f"peers {sorted(unknown)[:5]} are not neighbours that shared keys")
        missing = known - survivors - dropped
        if missing:
            raise SecAggRefused(f"neighbours {sorted(missing)[:5]} are neither survivors nor "
                                "dropped")
        if len(survivors) < self.params.threshold:
            raise SecAggRefused(f"only {len(survivors)} survivors; at least "
                                f"{self.params.threshold} are needed to unmask")
        self.stage = Stage.DONE
        return UnmaskResponse(
            seed_shares=tuple((v, self._seed_shares[v]) for v in sorted(survivors)),
            key_shares=tuple((v, self._key_shares[v]) for v in sorted(dropped)),
        )

    def _enter(self, stage: Stage) -> None:
        if self.stage is not stage:
            raise SecAggRefused(f"expected the {self.stage.name.lower()} stage, got the "
                                f"{stage.name.lower()} stage (out of order or replayed)")
        self.stage = Stage(stage + 1)


def _unique(items: Iterable[int], what: str) -> set[int]:
    seen: set[int] = set()
    for i in items:
        if i in seen:
            raise SecAggRefused(f"{what} {i} is listed twice")
        seen.add(i)
    return seen
