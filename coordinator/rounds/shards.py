"""Rounds whose clear uploads go to aggregator shards (``fedctl aggregator serve``) instead of
this process: assignment at selection, upload tickets, progress, and the release that
combines the shards' partial sums (Bonawitz et al. 2019's per-round aggregators under a
master aggregator).

::

    admit      each seat is assigned a shard, round-robin over the shards that answer
    plan       the device's plan names its shard and carries a ticket the coordinator
               signed (core.shards.UploadTicket): the shard needs no other word to take it
    advance    the devices each shard accepted (polled by the pool, off the event loop)
               become the round's reports, so the goal, deadline and min_reports rules are
               the unsharded round's
    release    (commit thread) each shard's partial sum is collected once and summed; a
               shard that does not answer loses only its group, and the round commits from
               the others when ``min_reports`` remain, else fails with the reason and is
               redone; DP noise is added once, to the sum, by TaskPrivacy

Which tasks are sharded (:func:`shard_mode`): synchronous rounds of clear updates combined by
a sum: FedAvg (with or without local DP) and central DP. Secure aggregation, robust rules,
asynchronous FedBuff and evaluation tasks keep their uploads on the coordinator.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from coordinator.rounds.aggregators import Aggregate, ReleaseRefused
from coordinator.rounds.errors import InvalidRequest
from core.privacy.errors import PrivacyError
from core.privacy.noise import NoiseSource
from core.privacy.task import TaskPrivacy
from core.protocol import MetricsPolicy
from core.sampling import CohortDraw
from core.secagg.messages import RingVector
from core.shards import PartialSum, RoundKey, ShardMode, SignedTicket, UploadTicket, combine
from core.types import RobustKind, TaskSpec


class ShardUnavailable(Exception):
    """A shard did not answer (down, unreachable, or out of time); the message says why."""


class ShardPool(Protocol):
    """The coordinator's view of its aggregator shards (thread-safe: the event loop and the
    commit thread both call it). The gRPC implementation is
    :class:`coordinator.transport.shard_client.GrpcShardPool`."""

    @property
    def addresses(self) -> tuple[str, ...]:
        """Each shard's address as devices reach it, by index."""
        ...

    def sign(self, ticket: UploadTicket) -> SignedTicket: ...

    def healthy(self) -> list[int]:
        """The shards that answered the last poll (every shard before the first)."""
        ...

    def watch(self, key: RoundKey) -> None:
        """Starts polling the shards for this round's progress."""
        ...

    def reported(self, key: RoundKey) -> Mapping[int, frozenset[str]]:
        """The devices each shard has accepted in this round, as of the last poll."""
        ...

    def collect(self, key: RoundKey, shard: int, size: int) -> PartialSum | None:
        """Closes the round on ``shard`` and returns its partial sum of ``size`` values (None:
        the shard took no upload in it). Blocks (the commit thread calls it).

        Raises:
            ShardUnavailable: the shard did not answer, or answered with an invalid sum (of
                another size: refused before anything is allocated for it).
        """
        ...

    def forget(self, key: RoundKey) -> None:
        """Stops polling the round and tells every shard to drop it (in the background)."""
        ...

    def close(self) -> None: ...


def shard_mode(spec: TaskSpec, privacy: TaskPrivacy | None, *, asynchronous: bool,
               evaluation: bool) -> ShardMode | None:
    """How a task's rounds fold uploads at the shards; None: the task is not sharded (its
    uploads need the coordinator: secure aggregation, a robust rule, FedBuff, evaluation)."""
    if asynchronous or evaluation or spec.secure_aggregation is not None:
        return None
    if spec.aggregation.robust.kind is not RobustKind.MEAN:
        return None
    if privacy is None:
        return ShardMode.FEDAVG
    if privacy.distributed:
        return None
    return ShardMode.CLIPPED_SUM


@dataclass
class ShardRound:
    """One attempt of a sharded round: which shard each seat was assigned. The event loop
    assigns; the commit thread reads the assignment once the round stopped taking seats."""

    key: RoundKey
    mode: ShardMode
    size: int
    shards: int
    assigned: dict[str, int] = field(default_factory=dict)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def assign(self, device: str, healthy: list[int]) -> int:
        """The shard of a newly seated device: the next one in turn among ``healthy`` (all
        of them when none is)."""
        choices = healthy or list(range(self.shards))
        with self._lock:
            shard = choices[self._next % len(choices)]
            self._next += 1
            self.assigned[device] = shard
        return shard

    def groups(self) -> dict[int, set[str]]:
        with self._lock:
            out: dict[int, set[str]] = {}
            for device, shard in self.assigned.items():
                out.setdefault(shard, set()).add(device)
        return out

    def accepted(self, reported: Mapping[int, frozenset[str]]) -> set[str]:
        """The devices of ``reported`` that reported at their own shard."""
        with self._lock:
            return {d for shard, devices in reported.items() for d in devices
                    if self.assigned.get(d) == shard}


class ShardedAggregator:
    """The :class:`~coordinator.rounds.aggregators.Aggregator` of a sharded round: it takes no
    upload itself; its release collects and combines the shards' partial sums."""

    def __init__(self, pool: ShardPool, rnd: ShardRound, *, min_reports: int,
                 privacy: TaskPrivacy | None, noise: NoiseSource,
                 require_secure_noise: bool, withhold_metrics: bool,
                 weight_cap: int) -> None:
        self._pool = pool
        self._weight_cap = weight_cap
        self.round = rnd
        self._min_reports = min_reports
        self._privacy = privacy
        self._noise = noise
        self._require_secure = require_secure_noise
        if rnd.mode is ShardMode.CLIPPED_SUM or withhold_metrics:
            self.metrics_policy = MetricsPolicy.WITHHELD
        else:
            self.metrics_policy = MetricsPolicy.CLEAR

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        raise InvalidRequest("this round's updates go to aggregator shards: upload to the "
                             "address in the plan's shard_upload, with its ticket")

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        self.check_upload(metrics)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        raise InvalidRequest("this task does not use secure aggregation")

    def _problem(self, shard: int, part: PartialSum | None, polled: frozenset[str]
                 ) -> str | None:
        """Why a shard's partial sum must not be used (its group is then lost); None if it
        may. The coordinator checks what it can, so a shard that lost or miscounted its
        round cannot move the model or the privacy accounting: it must name every device the
        coordinator saw it accept (a shard restarted mid-round knows none), only devices
        assigned to it, each once; under central DP its sum must be what clipping allows."""
        reported = [] if part is None else part.reported
        missing = polled.difference(reported)
        if missing:
            return (f"its partial sum lacks {len(missing)} of the devices it had accepted "
                    "(restarted mid-round?)")
        if part is None:
            return None
        rnd = self.round
        if any(rnd.assigned.get(d) != shard for d in part.reported):
            return "it folded devices assigned to another shard"
        if len(set(part.reported)) != len(part.reported):
            return "it named a device twice"
        if not np.all(np.isfinite(part.total)):
            return "its partial sum is not finite"
        if rnd.mode is ShardMode.CLIPPED_SUM:
            privacy = self._privacy
            assert privacy is not None
            count = part.count
            bound = count * privacy.clip * (1 + 1e-6) + 1e-9
            if part.weight != count or not 0 <= part.unclipped <= count:
                return (f"its clipped sum counts {part.weight:g} updates and {part.unclipped:g} "
                        f"unclipped bits for {count} devices")
            if float(np.linalg.norm(part.total)) > bound:
                return "its clipped sum is longer than its devices' clipped updates can make it"
        elif part.count and not 0 < part.weight <= part.count * self._weight_cap:
            return (f"its weight total {part.weight:g} is not what {part.count} devices of "
                    f"weight at most {self._weight_cap} can make")
        return None

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Collects every shard that was assigned devices; releases as the unsharded
        aggregator of the mode would (FedAvg: the weighted mean, the weight total and the
        metric means unless withheld; central DP: the noised sum over the fixed denominator
        and the accounting metrics), plus ``shards`` (groups collected) and ``shards_lost``.

        Raises:
            ReleaseRefused: fewer than min_reports updates in the shards that answered (the
                reason names the lost shards), or privacy refused the release.
        """
        rnd = self.round
        groups = rnd.groups()
        polled = self._pool.reported(rnd.key)

        def collect(shard: int) -> tuple[PartialSum | None, str | None]:
            try:
                part = self._pool.collect(rnd.key, shard, rnd.size)
            except ShardUnavailable as exc:
                return None, str(exc)
            return part, self._problem(shard, part, polled.get(shard, frozenset()))

        parts: list[PartialSum] = []
        lost: list[str] = []
        shards = sorted(groups)
        # All at once: a shard that hangs costs its own timeout, not the sum of them.
        with ThreadPoolExecutor(max(1, len(shards)), thread_name_prefix="collect") as pool:
            collected = list(pool.map(collect, shards))
        for shard, (part, problem) in zip(shards, collected, strict=True):
            if problem is not None:
                lost.append(f"shard {shard} ({self._pool.addresses[shard]}): {problem}")
            elif part is not None:
                parts.append(part)
        try:
            total = combine(parts, size=rnd.size, mode=rnd.mode)
        except ValueError as exc:
            raise ReleaseRefused(f"the shards' partial sums do not combine: {exc}") from None
        if total.count < max(self._min_reports, 1):
            raise ReleaseRefused(
                f"{total.count} updates reached the coordinator from {len(parts)} shards, "
                f"under min_reports {self._min_reports}"
                + (f"; lost: {'; '.join(lost)}" if lost else ""))
        public = {"reports": float(total.count), "shards": float(len(parts)),
                  "shards_lost": float(len(lost))}
        reported = frozenset(total.reported)
        if rnd.mode is ShardMode.FEDAVG:
            mean = np.empty(rnd.size, dtype=np.float32)
            np.divide(total.total, total.weight, out=mean, casting="same_kind")
            if self.metrics_policy is MetricsPolicy.WITHHELD:
                return Aggregate(mean, public, reported=reported)
            metrics = {name: s / total.metric_weights[name]
                       for name, s in total.metric_sums.items()
                       if total.metric_weights.get(name, 0.0) > 0}
            return Aggregate(mean, {"examples": total.weight, **metrics, **public},
                             reported=reported)
        privacy = self._privacy
        assert privacy is not None and draw is not None, "a DP round has privacy and a draw"
        try:
            release = privacy.release(
                total.total, total.unclipped if privacy.adaptive is not None else None,
                draw=draw, source=self._noise, require_secure=self._require_secure)
        except PrivacyError as exc:
            raise ReleaseRefused(f"differential privacy refused the release: {exc}") from None
        return Aggregate(release.mean, {**release.metrics, **public}, release,
                         reported=reported)


__all__ = [
    "ShardPool",
    "ShardRound",
    "ShardUnavailable",
    "ShardedAggregator",
    "shard_mode",
]
