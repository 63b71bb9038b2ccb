"""Sticky, unbiased arm assignment: a keyed hash of the device id decides the arm.

``u = HMAC-SHA256(key=salt, msg=DOMAIN || device_id)`` read as a 53-bit fraction in [0, 1);
the device goes to the arm whose slice of [0, 1) under the cumulative traffic split holds
``u``. Why this construction:

- **Sticky**: a pure function of (salt, device id, split). The same device gets the same arm
  in every round, after a coordinator restart and in any process; nothing is stored.
- **Unbiased**: HMAC-SHA256 is a PRF, so for a secret or at least experiment-specific salt the
  ``u`` of distinct devices are indistinguishable from independent uniforms: arm sizes are
  Binomial(n, weight), with no modulo bias (53 bits, split by comparison, not ``% k``) and no
  dependence on how ids are spelled (sequential ids, shared prefixes).
- **Independent experiments**: a different salt gives an independent assignment, so an arm of
  one experiment is not correlated with an arm of another that runs on the same devices. Use
  :func:`new_salt` (128 random bits) per experiment; reusing a salt reuses the assignment.
- The domain prefix keeps these hashes apart from any other use of the same key.

**Stratification (the choice made here)**: the stratum is *not* part of the hash. A device's
``u`` depends on its id and the salt only; a stratum (device class, OS, country: attributes
the caller derives) chooses *which traffic split* applies to that ``u``
(:class:`StratifiedSplit`). Reasons:

1. Hashing the stratum in buys no balance: within a stratum the draws are independent
   uniforms either way (a hash cannot do blocked randomization without state), so the arm
   shares in every stratum are already Binomial around the split.
2. Hashing it in breaks stickiness whenever an attribute changes (an OS update would move a
   device to a fresh random arm, mixing exposures). Keeping ``u`` fixed means a device that
   moves between strata with the same split keeps its arm, and between different splits
   moves only as far as the boundaries moved.
3. Per-stratum splits are what stratification is needed for in practice: ramp a risky
   variant at 5% on low-end devices and 50% elsewhere, or exclude a stratum (weight 0).

Consequence for analysis: when splits differ between strata and the metric differs between
strata, a pooled difference in means is confounded; compare within strata (and check the
sample ratio per stratum: :func:`core.experiments.srm.stratified_srm_check`).

**Where a stratum comes from**: the device declares it (``fedctl agent run --stratum NAME``,
sent in its check-in); it is a name of at most :data:`MAX_STRATUM_LENGTH` characters of
letters, digits, ``_`` and ``-`` (:func:`stratum_problem`). A device with no stratum, or one
the experiment does not name, uses the default split. The declaration is self-reported,
and the salt travels in the plan, so a device can compute its ``u``: one that lies about its
stratum chooses which split applies to it, and where the splits differ enough (a weight 0
in one) thereby its arm. The coordinator binds the first stratum a device declares in a
round, and an experiment counts each device once, so a device gets one choice; that choice
biases the comparison only where it correlates with the device's outcome. Where devices are
not trusted, derive strata from attested attributes, or use strata only where the splits
are close.

All functions are pure and thread-safe.
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

_DOMAIN = b"fedcoord/experiment-assignment/v1\x00"
_WEIGHT_SUM_TOLERANCE = 1e-9

#: Longest stratum name a device may declare (and an experiment may name).
MAX_STRATUM_LENGTH = 32
_STRATUM = re.compile(r"[A-Za-z0-9_-]+")


def stratum_problem(name: str) -> str | None:
    """Why ``name`` is not a stratum name (1 to :data:`MAX_STRATUM_LENGTH` letters, digits,
    ``_`` or ``-``), or None. The message never echoes more than 40 characters of it."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_STRATUM_LENGTH:
        return f"must be at most {MAX_STRATUM_LENGTH} characters, got {len(name)}"
    if not _STRATUM.fullmatch(name):
        return f"must be letters, digits, _ or - only, got {name[:40]!r}"
    return None


def new_salt() -> str:
    """A fresh experiment salt: 128 bits from the OS CSPRNG, as 32 hex characters."""
    return secrets.token_hex(16)


def _key(salt: str | bytes) -> bytes:
    key = salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)
    if not key:
        raise ValueError("the experiment salt must not be empty")
    return key


def assignment_unit(device_id: str, salt: str | bytes) -> float:
    """The device's point ``u`` in [0, 1): the top 53 bits of HMAC-SHA256(salt, device id).

    Raises ``ValueError`` for an empty salt or device id.
    """
    return float(assignment_units([device_id], salt)[0])


def assignment_units(device_ids: Iterable[str], salt: str | bytes) -> npt.NDArray[np.float64]:
    """:func:`assignment_unit` of each id, as a float64 array in the ids' order (about 3 us
    an id: OpenSSL's one-shot HMAC, the bit twiddling vectorized)."""
    key = _key(salt)
    prefixes: list[bytes] = []
    for device_id in device_ids:
        if not device_id:
            raise ValueError("the device id must not be empty")
        prefixes.append(hmac.digest(key, _DOMAIN + device_id.encode("utf-8"), "sha256")[:8])
    top = np.frombuffer(b"".join(prefixes), dtype=">u8") >> np.uint64(11)
    return top.astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class TrafficSplit:
    """Traffic weights per arm, in arm order: non-negative, summing to 1 (within 1e-9), at
    least two arms. Arm ``i`` receives the devices whose ``u`` lies in
    ``[cumulative[i-1], cumulative[i])``. Raises ``ValueError`` on bad weights."""

    weights: tuple[float, ...]
    cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __init__(self, weights: Sequence[float]) -> None:
        ws = tuple(float(w) for w in weights)
        if len(ws) < 2:
            raise ValueError(f"a traffic split needs at least two arms, got {len(ws)}")
        if any(not math.isfinite(w) or w < 0.0 for w in ws):
            raise ValueError(f"traffic weights must be finite and >= 0, got {list(ws)}")
        total = math.fsum(ws)
        if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
            raise ValueError(f"traffic weights must sum to 1, got {total!r}")
        cumulative = list(np.cumsum(ws, dtype=np.float64))
        # The last boundary is exactly 1 so that every u < 1 lands in an arm, whatever the
        # rounding of the sum; trailing zero-weight arms keep their empty slices.
        last_positive = max(i for i, w in enumerate(ws) if w > 0.0)
        for i in range(last_positive, len(ws)):
            cumulative[i] = 1.0
        object.__setattr__(self, "weights", ws)
        object.__setattr__(self, "cumulative", tuple(float(c) for c in cumulative))

    @property
    def arms(self) -> int:
        return len(self.weights)

    def arm_of(self, u: float) -> int:
        """The arm index whose slice holds ``u`` (0 <= u < 1)."""
        return int(np.searchsorted(self.cumulative, u, side="right"))

    def arms_of(self, u: npt.ArrayLike) -> npt.NDArray[np.intp]:
        """:meth:`arm_of`, vectorized."""
        return np.searchsorted(self.cumulative, np.asarray(u, dtype=np.float64), side="right")


@dataclass(frozen=True)
class StratifiedSplit:
    """A default split and, per stratum name, a split that replaces it (same number of arms).
    Strata not listed use the default."""

    default: TrafficSplit
    by_stratum: Mapping[str, TrafficSplit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, split in self.by_stratum.items():
            if split.arms != self.default.arms:
                raise ValueError(
                    f"stratum {name!r} splits {split.arms} arms, the default {self.default.arms}"
                )

    def split_for(self, stratum: str | None) -> TrafficSplit:
        if stratum is None:
            return self.default
        return self.by_stratum.get(stratum, self.default)


def assign_arm(
    device_id: str,
    *,
    salt: str | bytes,
    split: TrafficSplit | StratifiedSplit,
    stratum: str | None = None,
) -> int:
    """The arm index of ``device_id`` in the experiment with ``salt``.

    With a :class:`StratifiedSplit`, ``stratum`` picks the split (the stratum never enters
    the hash; see the module docstring). Raises ``ValueError`` for an empty id or salt.
    """
    chosen = split.split_for(stratum) if isinstance(split, StratifiedSplit) else split
    return chosen.arm_of(assignment_unit(device_id, salt))


def assign_arms(
    device_ids: Sequence[str],
    *,
    salt: str | bytes,
    split: TrafficSplit | StratifiedSplit,
    strata: Sequence[str | None] | None = None,
) -> npt.NDArray[np.intp]:
    """:func:`assign_arm` for many devices (``strata[i]`` is device ``i``'s stratum)."""
    units = assignment_units(device_ids, salt)
    if isinstance(split, TrafficSplit):
        return split.arms_of(units)
    if strata is None:
        return split.default.arms_of(units)
    if len(strata) != len(device_ids):
        raise ValueError(f"{len(strata)} strata for {len(device_ids)} devices")
    out = np.empty(len(device_ids), dtype=np.intp)
    labels = np.asarray([s if s is not None else "" for s in strata], dtype=object)
    for name in set(labels.tolist()):
        mask = labels == name
        out[mask] = split.split_for(name or None).arms_of(units[mask])
    return out
