"""One round's running partial sum on a shard: what its accepted uploads add up to, in the
form :class:`core.shards.PartialSum` hands to the coordinator.

Memory is O(model): one float64 sum, plus one read chunk per fold in flight. An update is
read back from its spool file a chunk at a time (:func:`coordinator.rounds.uploads.
iter_float32`) and never held whole:

- FEDAVG adds ``capped_weight(num_examples, weight_cap) x update`` and the weight, and
  (with ``clear_metrics``) the metrics' weighted sums as the coordinator's
  :class:`~coordinator.rounds.aggregators.MetricMeans` keeps them.
- CLIPPED_SUM adds the update clipped to ``clip_norm`` in L2 with weight 1, and the
  adaptive-clipping bit. The clip factor is :class:`core.privacy.central.ClippedSum`'s
  (``min(1, clip_norm / norm)``), from the norm the spool computed as the chunks arrived,
  so clipping needs no second pass and no copy of the update.

Thread-safe: folds of one round are serialised by its lock (numpy releases the GIL while it
adds, so two unguarded folds could lose each other's additions).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from coordinator.rounds.aggregators import MetricMeans
from coordinator.rounds.uploads import iter_float32
from core.aggregation.bounds import capped_weight
from core.protocol import UNCLIPPED_METRIC
from core.shards import PartialSum, ShardMode, UploadTicket


class RoundSum:
    """The running sum of one round, shaped by the round's first ticket (mode, values,
    weight cap, clip norm, metric policy)."""

    def __init__(self, ticket: UploadTicket) -> None:
        self.mode = ticket.mode
        self.values = ticket.values
        self._weight_cap = ticket.weight_cap
        self._clip_norm = ticket.clip_norm
        self._clear_metrics = ticket.clear_metrics
        # np.zeros maps zeroed pages lazily: a round's sum costs memory as it is written.
        self._total = np.zeros(ticket.values, dtype=np.float64)
        self._weight = 0.0
        self._unclipped = 0.0
        self._metrics = MetricMeans(float(max(ticket.weight_cap, 1)))
        self._lock = threading.Lock()

    def fold(self, path: Path, *, num_examples: int, metrics: Mapping[str, float],
             norm: float) -> None:
        """Adds the checked update in ``path`` (raw little-endian float32, ``values`` of
        them, L2 norm ``norm``, finite). Reads the file: call it off the event loop."""
        with self._lock:
            if self.mode is ShardMode.FEDAVG:
                weight = float(capped_weight(num_examples, weight_cap=self._weight_cap))
                scale = weight
            else:
                weight = 1.0
                scale = 1.0 if norm <= self._clip_norm else self._clip_norm / norm
            for offset, values in iter_float32(path):
                segment = self._total[offset:offset + values.size]
                segment += np.multiply(values, scale, dtype=np.float64)
            self._weight += weight
            if self.mode is ShardMode.CLIPPED_SUM:
                self._unclipped += metrics.get(UNCLIPPED_METRIC, 0.0)
            elif self._clear_metrics:
                self._metrics.add(metrics, weight)

    def partial(self, reported: list[str]) -> PartialSum:
        """The partial sum so far, for ``reported`` (the devices folded in). Its ``total``
        is this object's own array, not a copy: take it only once no fold can follow (the
        round is collected and its folds in flight are done)."""
        with self._lock:
            return PartialSum(self.mode, self._total, list(reported), weight=self._weight,
                              unclipped=self._unclipped,
                              metric_sums=dict(self._metrics.sums),
                              metric_weights=dict(self._metrics.weights))
