"""How a round's contributions become the mean update it releases: one protocol, one class
per variant, so the round machine makes one call (:meth:`Aggregator.release`) and never
branches on secure / DP. Privacy is one object (:class:`core.privacy.task.TaskPrivacy`)
held by the aggregators that need it.

::

    Aggregator (begin: :func:`begin_aggregation`; add: add_upload / add_masked; release)
      PlainAggregator       clear uploads, example-weighted FedAvg (weights capped at
                            robustness.weight_cap), metrics in the clear
      RobustAggregator      clear uploads held whole until release, combined by the task's
                            ``aggregation.robust`` rule (median, trimmed mean, Krum, ...)
      CentralDpAggregator   clear uploads clipped again to C, weight 1; the sum is noised
                            and accounted; no per-device metric is kept or released
      SecureAggregator      masked vectors only (SecAgg+ stages in :class:`SecureRound`);
                            the unmasked sum is decoded, then released as it is (metrics:
                            their masked sums) or through TaskPrivacy (central noise, or the
                            distributed noise floor check); under DP no metric is released

What each variant releases per round is in its ``release`` docstring; what devices send is
the plan's :class:`core.protocol.MetricsPolicy` (:attr:`Aggregator.metrics_policy`). Rounds of
evaluation tasks sum report vectors instead, with the same protocol: plain, central DP and
secure variants in :mod:`coordinator.rounds.evaluation_aggregators`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.secure import SecureRound, decode_sum
from coordinator.rounds.uploads import accumulate
from core.aggregation.bounds import capped_weight
from core.aggregation.fedavg import StreamingWeightedMean
from core.aggregation.robust import RobustAggregationError, robust_aggregate
from core.privacy.central import ClippedSum
from core.privacy.errors import PrivacyError
from core.privacy.noise import NoiseSource
from core.privacy.task import Release, TaskPrivacy
from core.protocol import UNCLIPPED_METRIC, MetricsPolicy
from core.sampling import CohortDraw
from core.secagg import encoding
from core.secagg.messages import RingVector
from core.types import RobustAggregation, RobustKind, TaskSpec

#: A robust rule holds every update of a round in memory (float32, ``selection_target x
#: parameters x 4`` bytes) and combines them in float64 at release (a transient ~2x more):
#: tasks whose cohort of updates would exceed this many bytes are refused at launch.
MAX_ROBUST_UPDATE_BYTES = 512 << 20


class ReleaseRefused(Exception):
    """The round's aggregate must not be released (the reason says why); the round fails
    and nothing is committed or accounted."""


@dataclass(frozen=True)
class Aggregate:
    """A round's released mean update (flat float32), the metrics released with it, and
    the DP release to account once the commit is durable (None without DP)."""

    mean: npt.NDArray[np.float32]
    metrics: Mapping[str, float]
    release: Release | None = None
    #: The devices whose updates are in the aggregate, where the aggregator learned them
    #: itself (aggregator shards: uploads the coordinator had not yet heard of count too);
    #: None: the round's own reports.
    reported: frozenset[str] | None = None


class Aggregator(Protocol):
    """One round's aggregation. Not thread-safe (the service's event loop)."""

    #: How devices send their metrics this round.
    metrics_policy: MetricsPolicy

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Checks that a clear upload with these metrics may come at all; returns the
        metrics that may be stored with the device's participation row (none unless the
        policy is CLEAR).

        Raises:
            InvalidRequest: the task takes no clear uploads, or metrics it must not receive.
        """
        ...

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        """Folds a checked clear update (raw float32 file) in, with its metrics (after
        :meth:`check_upload` accepted them). ``scale``: the factor the update is multiplied
        by, its weight in the mean's denominator unchanged (an asynchronous update's
        staleness weight, at most 1; 1 in synchronous rounds). :class:`PlainAggregator` and
        :class:`CentralDpAggregator` take a scale other than 1 (launch refuses asynchronous
        tasks the others would serve).

        Raises:
            InvalidRequest: a ``scale`` the aggregator cannot apply.
        """
        ...

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        """Takes a device's masked vector (secure aggregation only).

        Raises:
            InvalidRequest: the task has no secure aggregation, or a malformed vector.
        """
        ...

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """The round's mean update and released metrics; ``draw``: what selection did (the
        accountant's input under DP).

        Raises:
            ReleaseRefused: privacy (or the decoding) forbids releasing this round.
        """
        ...


@dataclass
class MetricMeans:
    """Weighted means of clear metrics: ``eval_*`` weigh by the device's ``eval_examples``,
    all others by its training examples, both at most ``weight_cap``. Metrics are at most
    1e9 in magnitude (checked at the upload), so the sums stay finite."""

    weight_cap: float
    sums: dict[str, float] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def add(self, metrics: Mapping[str, float], examples: float) -> None:
        eval_weight = min(float(metrics.get("eval_examples", 0.0)), self.weight_cap)
        for name, value in metrics.items():
            if name == "eval_examples":
                continue
            w = eval_weight if name.startswith("eval_") else examples
            if w > 0:
                self.sums[name] = self.sums.get(name, 0.0) + w * value
                self.weights[name] = self.weights.get(name, 0.0) + w

    def means(self) -> dict[str, float]:
        return {name: total / self.weights[name] for name, total in self.sums.items()}


def _unscaled(scale: float) -> None:
    if scale != 1.0:
        raise InvalidRequest("only example-weighted FedAvg scales updates (asynchronous "
                             "aggregation's staleness weight)")


def _no_masked(device: str, vector: RingVector, clipped: int) -> None:
    raise InvalidRequest("this task does not use secure aggregation")


def _checked_clear_metrics(metrics: Mapping[str, float], policy: MetricsPolicy
                           ) -> dict[str, float]:
    """A clear upload's metrics, refused when the task withholds them or when they carry
    adaptive clipping's bit (which a clear aggregator never asked for)."""
    if UNCLIPPED_METRIC in metrics:
        raise InvalidRequest(f"metric {UNCLIPPED_METRIC!r} is only sent under adaptive "
                             "clipping")
    if metrics and policy is MetricsPolicy.WITHHELD:
        raise InvalidRequest(
            f"this task withholds per-device metrics (differential privacy); the report "
            f"carried {', '.join(sorted(metrics)[:4])}")
    return dict(metrics)


class PlainAggregator:
    """Example-weighted FedAvg of clear uploads (memory O(model)); an update's weight is
    ``min(num_examples, weight_cap)``, so no device owns the mean by claiming examples.
    ``withhold_metrics`` (local DP: the updates are private, their metrics would not be):
    devices send no metric and the example total is not released."""

    def __init__(self, size: int, *, weight_cap: int, withhold_metrics: bool = False) -> None:
        self._mean = StreamingWeightedMean(size)
        self._weight_cap = weight_cap
        self._metrics = MetricMeans(float(weight_cap))
        self._examples = 0
        self.metrics_policy = MetricsPolicy.WITHHELD if withhold_metrics else MetricsPolicy.CLEAR

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return _checked_clear_metrics(metrics, self.metrics_policy)

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        weight = capped_weight(num_examples, weight_cap=self._weight_cap)
        accumulate(path, self._mean, float(weight), scale=scale)
        self._examples += weight
        self._metrics.add(metrics, float(weight))

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        _no_masked(device, vector, clipped)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Releases the weighted mean, and (unless withheld) the weight total ("examples",
        capped per device) and the metrics' weighted means."""
        try:
            mean = self._mean.mean()
        except ValueError as exc:
            raise ReleaseRefused(str(exc)) from None
        if self.metrics_policy is MetricsPolicy.WITHHELD:
            return Aggregate(mean, {})
        return Aggregate(mean, {"examples": float(self._examples), **self._metrics.means()})


class RobustAggregator:
    """Clear uploads combined by a robust rule (:func:`core.aggregation.robust.robust_aggregate`).

    Memory is ``O(devices x model)``, unlike :class:`PlainAggregator`'s ``O(model)``: the
    rules need every update at once, and an upload's spool file is removed as soon as it is
    accepted, so :meth:`add_upload` reads it whole (float32) and keeps it until
    :meth:`release`. :func:`~coordinator.rounds.task_setup.check_supported` refuses tasks
    whose cohort would hold more than :data:`MAX_ROBUST_UPDATE_BYTES`. Weights are capped at
    ``weight_cap`` as in FedAvg (median and Krum ignore them). Metrics are the weighted means
    of every reporting device's metrics (kept or not), plus ``robust_kept`` and, for
    norm_bound, the bound and how many updates it scaled down."""

    def __init__(self, size: int, rule: RobustAggregation, *, weight_cap: int,
                 withhold_metrics: bool = False) -> None:
        self._size = size
        self._rule = rule
        self._weight_cap = weight_cap
        self._updates: list[npt.NDArray[np.float32]] = []
        self._weights: list[float] = []
        self._metrics = MetricMeans(float(weight_cap))
        self.metrics_policy = MetricsPolicy.WITHHELD if withhold_metrics else MetricsPolicy.CLEAR

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return _checked_clear_metrics(metrics, self.metrics_policy)

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        _unscaled(scale)
        update = np.fromfile(path, dtype="<f4")
        if update.size != self._size:  # the upload's size was checked against the model
            raise InvalidRequest(f"update has {update.size} values, the model {self._size}")
        weight = float(capped_weight(num_examples, weight_cap=self._weight_cap))
        self._updates.append(update)
        self._weights.append(weight)
        self._metrics.add(metrics, weight)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        _no_masked(device, vector, clipped)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Releases the rule's combination of the updates, the weight total ("examples",
        capped per device; of every report, kept or not), the metrics' weighted means and
        the rule's metrics (unless withheld: then only the rule's counts)."""
        if not self._updates:
            raise ReleaseRefused("no update was aggregated")
        try:
            result = robust_aggregate(np.stack(self._updates), self._weights, self._rule)
        except RobustAggregationError as exc:
            raise ReleaseRefused(str(exc)) from None
        mean = result.mean.astype(np.float32)
        if self.metrics_policy is MetricsPolicy.WITHHELD:
            return Aggregate(mean, result.metrics)
        return Aggregate(mean, {"examples": float(sum(self._weights)),
                                **self._metrics.means(), **result.metrics})


class CentralDpAggregator:
    """DP-FedAvg on clear uploads: each update clipped again to C (a device that skipped
    clipping cannot raise the sensitivity), weight 1, the sum noised by ``privacy``."""

    metrics_policy = MetricsPolicy.WITHHELD

    def __init__(self, size: int, privacy: TaskPrivacy, noise: NoiseSource, *,
                 require_secure_noise: bool) -> None:
        self._privacy = privacy
        self._noise = noise
        self._require_secure = require_secure_noise
        self._sum = ClippedSum(size, l2_clip_norm=privacy.clip)
        self._unclipped = 0.0

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        extra = sorted(set(metrics) - {UNCLIPPED_METRIC})
        if extra:
            raise InvalidRequest(
                f"this task withholds per-device metrics (differential privacy); the report "
                f"carried {', '.join(extra[:4])}")
        bit = metrics.get(UNCLIPPED_METRIC)
        if self._privacy.adaptive is not None and bit not in (0.0, 1.0):
            raise InvalidRequest(f"metric {UNCLIPPED_METRIC!r} must be 0 or 1 under "
                                 f"adaptive clipping, got {bit}")
        if self._privacy.adaptive is None and bit is not None:
            raise InvalidRequest(f"metric {UNCLIPPED_METRIC!r} is only sent under adaptive "
                                 "clipping")
        return {}

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        # Clipped here too: a device that skipped clipping cannot raise the sensitivity;
        # a staleness weight (<= 1) scales the clipped update, never past C.
        self._sum.add(np.fromfile(path, dtype="<f4"), weight=scale)
        self._unclipped += metrics.get(UNCLIPPED_METRIC, 0.0)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        _no_masked(device, vector, clipped)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Releases the noised sum / the fixed denominator (selection_target; an
        asynchronous task's buffer) and the accounting metrics (epsilon, the draw); no
        example count, no device metric."""
        assert draw is not None, "a DP round always has a recorded draw"
        try:
            release = self._privacy.release(
                self._sum.total, self._unclipped if self._privacy.adaptive else None,
                draw=draw, source=self._noise, require_secure=self._require_secure)
        except PrivacyError as exc:
            raise ReleaseRefused(f"differential privacy refused the release: {exc}") from None
        return Aggregate(release.mean, release.metrics, release)


class SecureAggregator:
    """Masked vectors only; at the end the unmasked sum is decoded. Vector layout (before
    the weight coordinate): the update, then the adaptive-clipping bit (DP, adaptive) or the
    :data:`~core.secagg.encoding.MASKED_METRICS` (no DP)."""

    def __init__(self, secure: SecureRound, size: int, privacy: TaskPrivacy | None,
                 noise: NoiseSource, *, require_secure_noise: bool) -> None:
        self.secure = secure
        self._size = size
        self._privacy = privacy
        self._noise = noise
        self._require_secure = require_secure_noise
        self._bit = privacy is not None and privacy.adaptive is not None
        self.metrics_policy = (MetricsPolicy.WITHHELD if privacy is not None
                               else MetricsPolicy.MASKED)
        self._metrics = (len(encoding.MASKED_METRICS)
                         if self.metrics_policy is MetricsPolicy.MASKED else 0)

    @property
    def vector_length(self) -> int:
        return self._size + self._bit + self._metrics + 1

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        raise InvalidRequest("this task uses secure aggregation: updates go through the "
                             "SecAgg stages, never in the clear")

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        _unscaled(scale)
        self.check_upload(metrics)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        if len(vector) != self.vector_length:
            parts = ["parameters"]
            if self._bit:
                parts.append("the unclipped bit")
            if self._metrics:
                parts.append(f"{self._metrics} masked metrics")
            raise InvalidRequest(
                f"masked input has {len(vector)} values; this round's input encodes to "
                f"{self.vector_length} ({', '.join(parts)} and the weight)")
        if clipped < 0 or clipped > len(vector):
            raise InvalidRequest(f"clipped_values {clipped} is not a count of coordinates")
        self.secure.masked_input(device, vector, clipped)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Without DP: the decoded weighted mean, the weight total ("examples", capped per
        device) and the masked metrics' means. With DP: the privacy release (no weight
        total, no metric). Both: the protocol's public facts (reports, dropouts, the
        parameters, the clipping count and the quantization error bound)."""
        try:
            decoded_sum = decode_sum(self.secure)
        except ValueError as exc:
            raise ReleaseRefused(f"the unmasked sum cannot be decoded: {exc}") from None
        decoded, weight, survivors = decoded_sum.mean, decoded_sum.weight, decoded_sum.survivors
        params = decoded_sum.params
        result = self.secure.result
        assert result is not None
        public = {**decoded_sum.public,
                  "secagg_max_error": encoding.max_mean_error(survivors, weight, params)}
        privacy = self._privacy
        if privacy is None:
            metrics = encoding.masked_metric_means(decoded[self._size:], params.clip)
            mean = decoded[:self._size].astype(np.float32)
            return Aggregate(mean, {"examples": float(weight), **metrics, **public})
        assert draw is not None, "a DP round always has a recorded draw"
        try:
            if privacy.distributed:
                total = encoding.unwrap_noisy_total(result.total, survivors, params)
                release = privacy.release_distributed(total, survivors, draw)
            else:
                # weight_cap is 1 under DP: each device's weight is 1, the weight coordinate
                # counts devices, and weight x mean is the plain sum of the clipped updates.
                total = decoded * weight
                unclipped = float(total[-1]) / params.clip if self._bit else None
                release = privacy.release(total[:self._size], unclipped, draw=draw,
                                          source=self._noise,
                                          require_secure=self._require_secure)
        except PrivacyError as exc:
            raise ReleaseRefused(f"differential privacy refused the release: {exc}") from None
        return Aggregate(release.mean, {**release.metrics, **public}, release)


def metrics_policy_for(spec: TaskSpec) -> MetricsPolicy:
    """How a task's devices send their metrics: withheld under any DP mode, masked under
    secure aggregation, else in the clear."""
    if spec.privacy is not None:
        return MetricsPolicy.WITHHELD
    if spec.secure_aggregation is not None:
        return MetricsPolicy.MASKED
    return MetricsPolicy.CLEAR


def begin_aggregation(spec: TaskSpec, size: int, *, privacy: TaskPrivacy | None,
                      secure: SecureRound | None, noise: NoiseSource,
                      require_secure_noise: bool) -> Aggregator:
    """The aggregator of a new round of ``spec``'s model (``size`` float32 parameters);
    ``privacy``: the task's central/distributed DP state (None for none or local DP). A
    robust rule other than the mean runs on clear uploads only (launch refused the others:
    :func:`~coordinator.rounds.task_setup.check_supported`)."""
    aggregator: Aggregator
    if secure is not None:
        aggregator = SecureAggregator(secure, size, privacy, noise,
                                      require_secure_noise=require_secure_noise)
    elif privacy is not None:
        aggregator = CentralDpAggregator(size, privacy, noise,
                                         require_secure_noise=require_secure_noise)
    elif spec.aggregation.robust.kind is not RobustKind.MEAN:
        aggregator = RobustAggregator(
            size, spec.aggregation.robust, weight_cap=spec.robustness.weight_cap,
            withhold_metrics=metrics_policy_for(spec) is MetricsPolicy.WITHHELD)
    else:
        aggregator = PlainAggregator(
            size, weight_cap=spec.robustness.weight_cap,
            withhold_metrics=metrics_policy_for(spec) is MetricsPolicy.WITHHELD)
    assert aggregator.metrics_policy is metrics_policy_for(spec)
    return aggregator


__all__ = [
    "Aggregate",
    "Aggregator",
    "CentralDpAggregator",
    "MetricMeans",
    "PlainAggregator",
    "MAX_ROBUST_UPDATE_BYTES",
    "ReleaseRefused",
    "RobustAggregator",
    "SecureAggregator",
    "begin_aggregation",
    "metrics_policy_for",
]
