"""The checks of an upload's content that the coordinator and its aggregator shards share
(:mod:`coordinator.aggregator_shard`): a light module, so a shard process loads no more than
it needs (no torch, no database)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from coordinator.rounds.errors import InvalidRequest, shown

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_METRICS = 32
#: Largest magnitude of a reported metric: weighted sums of them stay finite.
_MAX_METRIC_VALUE = 1e9


def update_refusal(norm: float, max_norm: float) -> InvalidRequest | None:
    """Why an update whose L2 norm is ``norm`` must not count; None if it may."""
    if not math.isfinite(norm):
        return InvalidRequest("update contains NaN or infinite values; it was rejected")
    if norm > max_norm:
        return InvalidRequest(f"update has L2 norm {norm:.4g}, over the task's bound of "
                              f"{max_norm:g} (robustness.max_update_l2_norm); it was rejected")
    return None


def check_metrics(metrics: Mapping[str, float]) -> None:
    """Refuses a report's metrics unless there are at most 32, each named by 1-64 of
    ``A-Za-z0-9_.:-`` and finite, at most 1e9 in magnitude (InvalidRequest)."""
    if len(metrics) > _MAX_METRICS:
        raise InvalidRequest(f"at most {_MAX_METRICS} metrics per report, got {len(metrics)}")
    for name, value in metrics.items():
        if not _METRIC_NAME.match(name):
            raise InvalidRequest(f"metric name {shown(name)} is not a valid name")
        if not math.isfinite(value):
            raise InvalidRequest(f"metric {name!r} is not finite ({value})")
        if abs(value) > _MAX_METRIC_VALUE:
            raise InvalidRequest(f"metric {name!r} is {value:.3g}; metrics are at most "
                                 f"{_MAX_METRIC_VALUE:g} in magnitude")
