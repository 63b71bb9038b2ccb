"""The server's side of a SecAgg+ round: it routes messages between devices and, at the end,
learns only the sum of the surviving devices' inputs.

Participants are keyed by the caller's ids (e.g. device ids) and numbered 1..n when
advertisement closes. Each ``close_*`` ends a stage (the caller decides when: all expected
messages arrived, or the stage's deadline passed) and returns the next stage's message for
every participant still in. A stage that can no longer end in a correct sum raises
SecAggAborted: the round releases nothing. A message that cannot be accepted raises
SecAggRejected and changes nothing, so one bad device does not break the round for the
others; the subclass says why (see :mod:`core.secagg.errors`): SecAggDuplicate for a second
message of the same stage, SecAggWrongStage for a message of another stage, SecAggRoundFull
for an advertisement beyond ``num_devices``; malformed messages and unknown senders raise
SecAggRejected itself.
"""

from __future__ import annotations

import hmac
import random
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from core.secagg import keys, shamir
from core.secagg.client import mask_sign, pair_context
from core.secagg.errors import (
    SecAggAborted,
    SecAggDuplicate,
    SecAggRejected,
    SecAggRoundFull,
    SecAggWrongStage,
)
from core.secagg.graph import neighbour_graph
from core.secagg.masks import PrgStream, ring_dtype
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

P = TypeVar("P", bound=Hashable)


@dataclass(frozen=True)
class SecAggResult(Generic[P]):
    total: RingVector
    survivors: tuple[P, ...]
    dropped: tuple[P, ...]


class SecAggServer(Generic[P]):
    def __init__(self, params: SecAggParams, context: bytes,
                 rng: random.Random | None = None) -> None:
        self.params = params
        self._context = context
        self._rng = rng if rng is not None else random.SystemRandom()
        self.stage = Stage.ADVERTISE
        self.aborted: str | None = None
        self._adverts: dict[P, KeyAdvertisement] = {}
        self._index: dict[P, int] = {}
        self._who: dict[int, P] = {}
        self._neighbours: dict[int, frozenset[int]] = {}
        self._shares: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> ciphertext
        self._u1: set[int] = set()
        self._holders: dict[int, frozenset[int]] = {}  # owner -> neighbours holding its shares
        self._masked: set[int] = set()
        self._total: RingVector | None = None  # running sum of the masked inputs
        self._unmasked: dict[int, UnmaskResponse] = {}

    # ---------------------------------------------------------------- stage 0

    def add_advertisement(self, who: P, message: KeyAdvertisement,
                          expected_config_hash: bytes | None = None) -> None:
        """``expected_config_hash``: the hash of the round's plan as the server sent it; an
        advertisement of another is refused here, alone, instead of every honest neighbour
        refusing it later (which would abort the round for all)."""
        self._expect(Stage.ADVERTISE)
        if who in self._adverts:
            raise SecAggDuplicate(f"{who} already advertised its keys")
        if expected_config_hash is not None and not hmac.compare_digest(
                message.config_hash, expected_config_hash):
            raise SecAggRejected("the advertised config_hash is not the hash of this round's "
                                 "plan (a stale or altered advertisement): get the plan again")
        for key in (message.encryption_public, message.mask_public):
            if len(key) != keys.PUBLIC_KEY_BYTES:
                raise SecAggRejected(f"a public key is {keys.PUBLIC_KEY_BYTES} bytes, "
                                     f"got {len(key)}")
        if message.encryption_public == message.mask_public:
            raise SecAggRejected("the encryption and mask public keys must differ")
        seen = {k for m in self._adverts.values() for k in (m.encryption_public, m.mask_public)}
        if message.encryption_public in seen or message.mask_public in seen:
            # A copied key would let its copier decrypt shares meant for the other device,
            # or collide their pairwise masks.
            raise SecAggRejected("a public key another participant advertised was sent again")
        if len(self._adverts) >= self.params.num_devices:
            raise SecAggRoundFull(f"the round already has {self.params.num_devices} participants")
        self._adverts[who] = message

    def close_advertise(self) -> dict[P, ShareKeysRequest]:
        self._expect(Stage.ADVERTISE)
        self.stage = Stage.SHARE_KEYS
        order = list(self._adverts)
        self._rng.shuffle(order)
        self._index = {who: i + 1 for i, who in enumerate(order)}
        self._who = {i: who for who, i in self._index.items()}
        self._need(len(order), "advertised keys")
        self._neighbours = neighbour_graph(sorted(self._who), self.params.neighbours, self._rng)
        out = {}
        for who, i in self._index.items():
            peers = tuple(
                PeerKeys(v, self._adverts[self._who[v]].encryption_public,
                         self._adverts[self._who[v]].mask_public,
                         self._adverts[self._who[v]].config_hash)
                for v in sorted(self._neighbours[i])
            )
            out[who] = ShareKeysRequest(i, peers)
        return out

    # ---------------------------------------------------------------- stage 1

    def add_shares(self, who: P, message: ShareKeysResponse) -> None:
        i = self._member(who, Stage.SHARE_KEYS)
        if i in self._shares:
            raise SecAggDuplicate(f"{who} already sent its shares")
        recipients = [v for v, _ in message.ciphertexts]
        if len(set(recipients)) != len(recipients) or set(recipients) != self._neighbours[i]:
            raise SecAggRejected(f"{who} must send exactly one ciphertext to each of its "
                                 f"{len(self._neighbours[i])} neighbours")
        self._shares[i] = dict(message.ciphertexts)

    def close_shares(self) -> dict[P, MaskedInputRequest]:
        self._expect(Stage.SHARE_KEYS)
        self.stage = Stage.MASKED_INPUT
        u1 = set(self._shares)
        # A device whose shares too few live holders keep could never be unmasked: leave it
        # out before anyone masks with it (which may strand others: repeat until stable).
        while True:
            weak = {u for u in u1 if len(self._neighbours[u] & u1) + 1 < self.params.threshold}
            if not weak:
                break
            u1 -= weak
        self._u1 = u1
        self._need(len(u1), "shared keys with enough neighbours")
        self._holders = {u: self._neighbours[u] & u1 for u in u1}
        return {
            self._who[u]: MaskedInputRequest(tuple(
                (v, self._shares[v][u]) for v in sorted(self._holders[u])
            ))
            for u in u1
        }

    # ---------------------------------------------------------------- stage 2

    def add_masked_input(self, who: P, vector: RingVector) -> None:
        i = self._member(who, Stage.MASKED_INPUT)
        if i not in self._u1:
            raise SecAggRejected(f"{who} did not take part in the share-keys stage")
        if i in self._masked:
            raise SecAggDuplicate(f"{who} already sent its masked input")
        dtype = ring_dtype(self.params.ring_bits)
        if vector.dtype != dtype or vector.ndim != 1:
            raise SecAggRejected(f"a masked input is a vector of {np.dtype(dtype).name}")
        if self._total is None:
            self._total = np.zeros(len(vector), dtype=dtype)
        elif len(vector) != len(self._total):
            raise SecAggRejected(f"masked input of {len(vector)} values; the round's inputs "
                                 f"have {len(self._total)}")
        self._total += vector  # wraps in the ring
        self._masked.add(i)

    def close_masked_inputs(self) -> dict[P, UnmaskRequest]:
        self._expect(Stage.MASKED_INPUT)
        self.stage = Stage.UNMASK
        u2 = set(self._masked)
        self._need(len(u2), "uploaded masked inputs")
        for u in self._u1:
            live = len(self._holders[u] & u2) + (1 if u in u2 else 0)
            if live < self.params.threshold:
                raise self.abort(
                    f"participant {u} keeps {live} live holders of its shares after the "
                    f"masked-input stage; {self.params.threshold} are needed"
                )
        return {
            self._who[u]: UnmaskRequest(
                survivors=tuple(sorted((self._holders[u] & u2) | {u})),
                dropped=tuple(sorted(self._holders[u] - u2)),
            )
            for u in u2
        }

    # ---------------------------------------------------------------- stage 3

    def add_unmask(self, who: P, message: UnmaskResponse) -> None:
        i = self._member(who, Stage.UNMASK)
        if i not in self._masked:
            raise SecAggRejected(f"{who} did not upload a masked input")
        if i in self._unmasked:
            raise SecAggDuplicate(f"{who} already sent its shares for unmasking")
        expect_seed = (self._holders[i] & self._masked) | {i}
        expect_key = self._holders[i] - self._masked
        seed_owners = [v for v, _ in message.seed_shares]
        key_owners = [v for v, _ in message.key_shares]
        if sorted(seed_owners) != sorted(expect_seed) or sorted(key_owners) != sorted(expect_key):
            raise SecAggRejected(f"{who} sent shares for the wrong participants")
        self._unmasked[i] = message

    def finish(self) -> SecAggResult[P]:
        """The sum of the survivors' inputs. Raises SecAggAborted (releasing nothing) if some
        seed or key cannot be rebuilt from the shares received."""
        self._expect(Stage.UNMASK)
        self.stage = Stage.DONE
        u2 = set(self._masked)
        dropped = self._u1 - u2
        seed_shares: dict[int, dict[int, bytes]] = {u: {} for u in u2}
        key_shares: dict[int, dict[int, bytes]] = {u: {} for u in dropped}
        for holder, response in self._unmasked.items():
            for owner, share in response.seed_shares:
                seed_shares[owner][holder] = share
            for owner, share in response.key_shares:
                key_shares[owner][holder] = share
        try:
            seeds = {u: self._rebuild(u, s, "self-mask seed") for u, s in seed_shares.items()}
            mask_keys = {u: self._rebuild(u, s, "mask key") for u, s in key_shares.items()}
        except shamir.ShamirError as exc:
            raise self.abort(str(exc)) from None
        assert self._total is not None
        bits = self.params.ring_bits
        total, self._total = self._total, None
        stream = PrgStream(len(total), bits)
        for seed in seeds.values():
            total -= stream.expand(seed)
        for u, raw in mask_keys.items():
            try:
                private = keys.private_from_bytes(raw)
            except keys.CryptoError as exc:
                raise self.abort(f"participant {u}'s mask key: {exc}") from None
            for v in self._holders[u] & u2:
                seed = keys.agree(private, self._adverts[self._who[v]].mask_public,
                                  context=pair_context(self._context, b"mask", v, u))
                if mask_sign(v, u) > 0:  # v added this mask for u; take it back out
                    total -= stream.expand(seed)
                else:
                    total += stream.expand(seed)
        return SecAggResult(total, tuple(self._who[u] for u in sorted(u2)),
                            tuple(self._who[u] for u in sorted(dropped)))

    def _rebuild(self, owner: int, shares: dict[int, bytes], what: str) -> bytes:
        if len(shares) < self.params.threshold:
            raise self.abort(f"only {len(shares)} shares of participant {owner}'s {what} "
                                f"arrived; {self.params.threshold} are needed")
        return shamir.combine(shares, threshold=self.params.threshold)

    # ---------------------------------------------------------------- helpers

    @property
    def advertised(self) -> int:
        return len(self._adverts)

    @property
    def participants(self) -> dict[P, int]:
        return dict(self._index)

    def pending(self) -> set[P]:
        """Participants from whom the current stage still expects a message."""
        if self.stage is Stage.ADVERTISE:
            return set()
        if self.stage is Stage.SHARE_KEYS:
            return {w for w, i in self._index.items() if i not in self._shares}
        if self.stage is Stage.MASKED_INPUT:
            return {self._who[u] for u in self._u1 if u not in self._masked}
        if self.stage is Stage.UNMASK:
            return {self._who[u] for u in self._masked if u not in self._unmasked}
        return set()

    def _need(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise self.abort(f"only {count} participants {what}; the threshold is "
                                f"{self.params.threshold}")

    def abort(self, reason: str) -> SecAggAborted:
        """Ends the round releasing nothing; returns the error to raise."""
        self.aborted = reason
        self.stage = Stage.DONE
        self._total = None
        return SecAggAborted(reason)

    def _expect(self, stage: Stage) -> None:
        if self.aborted is not None:
            raise SecAggAborted(f"the round was aborted: {self.aborted}")
        if self.stage is not stage:
            raise SecAggWrongStage(f"the round is in the {self.stage.name.lower()} stage, not "
                                 f"{stage.name.lower()}")

    def _member(self, who: P, stage: Stage) -> int:
        self._expect(stage)
        if who not in self._index:
            raise SecAggRejected(f"{who} is not a participant of this round")
        return self._index[who]


# SecAggAborted and SecAggRejected were defined here before core.secagg.errors; callers may
# still import them from this module.
__all__ = [
    "SecAggAborted",
    "SecAggRejected",
    "SecAggResult",
    "SecAggServer",
]
