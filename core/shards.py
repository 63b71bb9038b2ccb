"""Aggregator shards' contract, as pure code both sides use: the upload ticket a coordinator
signs for a device it assigned to a shard, and the partial sum a shard hands back.

A round of a sharded task (:mod:`coordinator.rounds.shards`) sends each selected device's
clear upload to one ``fedctl aggregator serve`` process instead of the coordinator. The
device carries an :class:`UploadTicket` it cannot alter (plain JSON under HMAC-SHA256 with the key
the coordinator and its shards share): it says which task, round and device the upload is
for, which shard takes it, and how that shard must fold it in (FedAvg weights, or DP
clipping). The shard needs no other word from the coordinator to take uploads; the
coordinator then collects each shard's :class:`PartialSum` once and combines them
(:func:`combine`), applies DP noise once and commits.

Nothing here does I/O; the wire form of a partial sum is the header fields of
``AggregatorService.CollectRound`` plus the float64 sum as raw little-endian bytes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from core.tensors import TensorInfo

#: Bytes of a key: the coordinator's master key (``fedctl aggregator keygen``, 32 random
#: bytes) and each shard's own key derived from it (:func:`derive_shard_key`).
KEY_BYTES = 32
#: What the coordinator's calls to a shard carry in the ``x-fedcoord-shard-auth`` metadata:
#: HMAC-SHA256(key, this) in hex; only the key's holders can compute it.
_ADMIN_PURPOSE = b"fedcoord/v1/shard-admin"
ADMIN_METADATA = "x-fedcoord-shard-auth"


class TicketError(ValueError):
    """A ticket that is not a valid signature under this key, or is malformed."""


class ShardMode(enum.Enum):
    """How a shard folds an update in."""

    #: Example-weighted FedAvg: sum of ``min(num_examples, weight_cap) x update``.
    FEDAVG = "fedavg"
    #: Central DP: each update clipped to ``clip_norm`` (L2), weight 1; no metric kept
    #: except the adaptive-clipping bit's sum.
    CLIPPED_SUM = "clipped_sum"


@dataclass(frozen=True)
class UploadTicket:
    """What the coordinator tells a shard about one device's upload (signed; the device
    only carries it)."""

    task_id: str
    round_id: int
    round_number: int
    device_id: str
    #: Index of the shard it is for (in the coordinator's ``--aggregator`` list).
    shard: int
    #: float32 values the update holds.
    values: int
    mode: ShardMode
    weight_cap: int
    #: CLIPPED_SUM's L2 bound (this round's, under adaptive clipping); 0 for FEDAVG.
    clip_norm: float
    #: The task's robustness.max_update_l2_norm (inf: none).
    max_update_l2_norm: float
    #: Per-device metrics the upload may carry in the clear (FedAvg without local DP); when
    #: False it may carry none, except ``adaptive_clipping``'s bit.
    clear_metrics: bool
    adaptive_clipping: bool
    #: Unix seconds after which the shard refuses this upload.
    deadline: float
    max_chunk_bytes: int
    max_num_examples: int
    #: :func:`tensors_digest` of the update's layout (the model's tensors, in order): the
    #: header's tensors must be these, as the coordinator requires of its own uploads.
    tensors: str

    def encode(self) -> bytes:
        """Canonical bytes (sorted JSON): what the MAC covers."""
        body = asdict(self)
        body["mode"] = self.mode.value
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def round_key(self) -> RoundKey:
        return RoundKey(self.task_id, self.round_id)


@dataclass(frozen=True)
class SignedTicket:
    body: bytes
    mac: bytes


@dataclass(frozen=True, order=True)
class RoundKey:
    """One attempt of one round (a redone round has a new round id)."""

    task_id: str
    round_id: int


def tensors_digest(tensors: Iterable[TensorInfo]) -> str:
    """SHA-256 (hex) of an update's layout: each tensor's name, dtype and shape, in order."""
    layout = [[t.name, t.dtype, list(t.shape)] for t in tensors]
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()


def parse_key(data: bytes) -> bytes:
    """A shard key from a key file's content: :data:`KEY_BYTES` raw bytes, or their hex (64
    characters, surrounding whitespace ignored).

    Raises:
        ValueError: anything else (the message says what the content was).
    """
    if len(data) == KEY_BYTES:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise ValueError(f"a shard key is {KEY_BYTES} bytes or {2 * KEY_BYTES} hex characters; "
                     f"this holds {len(data)} bytes")


def derive_shard_key(master: bytes, index: int) -> bytes:
    """Shard ``index``'s own key, from the coordinator's master key (HMAC-SHA256 under a label
    of its own). A shard holds only its key: it verifies the tickets made for it and the
    coordinator's calls to it, and can neither make tickets another shard accepts nor call
    another shard (``fedctl aggregator keygen --master FILE --index I``)."""
    if index < 0:
        raise ValueError(f"a shard index is >= 0, got {index}")
    return hmac.new(master, b"fedcoord/v1/shard-key\x00" + str(index).encode(),
                    hashlib.sha256).digest()


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, b"fedcoord/v1/upload-ticket\x00" + body, hashlib.sha256).digest()


def sign_ticket(ticket: UploadTicket, key: bytes) -> SignedTicket:
    body = ticket.encode()
    return SignedTicket(body, _mac(key, body))


_FIELDS = {f for f in UploadTicket.__dataclass_fields__}


def verify_ticket(signed: SignedTicket, key: bytes) -> UploadTicket:
    """The ticket, once its MAC checks under ``key``.

    Raises:
        TicketError: a bad MAC (not signed by a holder of the key, or altered), or a body
            that is not a ticket.
    """
    if not hmac.compare_digest(_mac(key, signed.body), signed.mac):
        raise TicketError("the upload ticket's signature does not verify: it was not issued "
                          "by this shard's coordinator, or was altered")
    try:
        body = json.loads(signed.body)
        if not isinstance(body, dict) or set(body) != _FIELDS:
            raise TicketError("the upload ticket's fields are not a ticket's")
        body["mode"] = ShardMode(body["mode"])
        return UploadTicket(**body)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TicketError):
            raise
        raise TicketError(f"the upload ticket is malformed: {exc}") from None


def admin_token(key: bytes) -> str:
    """The value of :data:`ADMIN_METADATA` on the coordinator's calls to its shards."""
    return hmac.new(key, _ADMIN_PURPOSE, hashlib.sha256).hexdigest()


def check_admin_token(key: bytes, presented: str) -> bool:
    return hmac.compare_digest(admin_token(key), presented)


@dataclass
class PartialSum:
    """What one shard folded from its devices' uploads in one round.

    FEDAVG: ``total`` = sum of weight_i x update_i, ``weight`` = sum of the capped weights,
    ``metric_sums``/``metric_weights`` as the coordinator's clear metric means keep them
    (empty when metrics are withheld). CLIPPED_SUM: ``total`` = sum of the clipped updates,
    ``weight`` = their number, ``unclipped`` = the sum of adaptive clipping's bits (1 for an
    update whose norm fitted under the clip, :data:`core.protocol.UNCLIPPED_METRIC`). ``reported``: the devices folded in, each once."""

    mode: ShardMode
    total: npt.NDArray[np.float64]
    reported: list[str]
    weight: float = 0.0
    unclipped: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weights: dict[str, float] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.reported)

    def header(self) -> dict[str, object]:
        """The fields besides ``total`` (for the wire)."""
        return {"mode": self.mode.value, "reported": list(self.reported),
                "weight": self.weight, "unclipped": self.unclipped,
                "metric_sums": dict(self.metric_sums),
                "metric_weights": dict(self.metric_weights)}


def combine(parts: Iterable[PartialSum], *, size: int, mode: ShardMode) -> PartialSum:
    """The sum of several shards' partial sums of one round (devices in two parts are an
    error: a device is assigned one shard).

    Raises:
        ValueError: a part of another mode or size, or a device reported twice.
    """
    total = np.zeros(size, dtype=np.float64)
    out = PartialSum(mode, total, [])
    seen: set[str] = set()
    for part in parts:
        if part.mode is not mode:
            raise ValueError(f"a partial sum of mode {part.mode.value} in a {mode.value} round")
        if part.total.shape != (size,):
            raise ValueError(f"a partial sum of {part.total.size} values; the model has {size}")
        twice = seen.intersection(part.reported)
        if twice:
            raise ValueError(f"device {sorted(twice)[0]} is in two partial sums")
        seen.update(part.reported)
        np.add(total, part.total, out=total)
        out.reported.extend(part.reported)
        out.weight += part.weight
        out.unclipped += part.unclipped
        _add_into(out.metric_sums, part.metric_sums)
        _add_into(out.metric_weights, part.metric_weights)
    return out


def _add_into(into: dict[str, float], more: Mapping[str, float]) -> None:
    for name, value in more.items():
        into[name] = into.get(name, 0.0) + value


__all__ = [
    "ADMIN_METADATA",
    "KEY_BYTES",
    "PartialSum",
    "RoundKey",
    "ShardMode",
    "SignedTicket",
    "TicketError",
    "UploadTicket",
    "admin_token",
    "check_admin_token",
    "combine",
    "derive_shard_key",
    "parse_key",
    "sign_ticket",
    "tensors_digest",
    "verify_ticket",
]
