"""How an evaluation round's reports become its results: the :class:`~coordinator.rounds.
aggregators.Aggregator` protocol, one class per variant, each *summing* the devices' report
vectors (:mod:`core.evaluation.layout`) and releasing the summaries of the sum
(:func:`core.evaluation.summary.summarize`) as round metrics ``eval.v<version>.<metric>.<stat>``.

::

    PlainEvaluation      clear reports, each checked (bounds and internal consistency,
                         :func:`core.evaluation.report.report_problem`), summed exactly;
                         in an experiment with per-stratum splits also the devices per
                         stratum and arm (:class:`~coordinator.rounds.evaluation_tasks.
                         StrataTally`, counted by participation);
                         where the plan sketches per-example values (``plan.sketch``), the
                         devices' KLL sketches are merged per version and metric and
                         released as ``example_q<p>`` with ``example_rank_error``
    CentralDpEvaluation  clear reports, checked, unit-scaled to an L2 norm <= C (by
                         construction; clipped again anyway), summed, noised by TaskPrivacy
                         (N(0, (z C)^2) per coordinate) and accounted; sums rescaled
    SecureEvaluation     masked unit-scaled reports (SecAgg+ stages); the unmasked sum is
                         decoded and rescaled: without DP released with the quantization
                         error bound of each mean (``...mean_bound``); with DP noised and
                         accounted as above

Only PlainEvaluation sees sketches: a KLL merge is not a sum, so it can be neither masked nor
noised, and plans under secure aggregation or DP have none (:func:`coordinator.rounds.
evaluation_tasks.sketches_examples`); their quantiles come from the summed histograms.
Under DP the released sums carry the noise: the means are ratios of noisy sums, the SEs do not
include the noise, and histogram counts may be negative (quantiles count them as 0). The
Aggregate's ``mean`` is empty: an evaluation round has no model update.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from coordinator.rounds.aggregators import Aggregate, Aggregator, ReleaseRefused
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.evaluation_tasks import EvaluationSetup
from coordinator.rounds.secure import SecureRound, decode_sum
from core.evaluation import (
    KllSketch,
    kll,
    mean_error_bounds,
    report_problem,
    report_scale,
    round_metrics,
    sum_error_bounds,
    summarize,
)
from core.privacy.central import ClippedSum
from core.privacy.errors import PrivacyError
from core.privacy.noise import NoiseSource
from core.privacy.task import TaskPrivacy
from core.protocol import MetricsPolicy
from core.sampling import CohortDraw
from core.secagg.messages import RingVector

_NO_UPDATE = np.zeros(0, dtype=np.float32)


def _no_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if metrics:
        raise InvalidRequest(f"an evaluation report carries its values in the report vector; "
                             f"this one also carried metrics {', '.join(sorted(metrics)[:4])}")
    return {}


def _checked_report(setup: EvaluationSetup, path: Path) -> np.ndarray:
    vector = np.fromfile(path, dtype="<f4").astype(np.float64)
    problem = report_problem(setup.layout, vector)
    if problem is not None:  # checked before it was accepted; a changed file is a bug
        raise InvalidRequest(f"evaluation report refused: {problem}")
    return vector


def _results(setup: EvaluationSetup, sums: np.ndarray,
             sketches: Mapping[tuple[int, str], KllSketch] | None = None) -> dict[str, float]:
    return round_metrics(summarize(setup.layout, sums, setup.quantiles, sketches=sketches))


class PlainEvaluation:
    """Exact sums of checked clear reports, and the merge of their sketches (memory: one
    sketch per version and sketched metric, a few thousand items each at most). ``rng``:
    the merges' coins (fresh from the OS when None)."""

    metrics_policy = MetricsPolicy.CLEAR

    def __init__(self, setup: EvaluationSetup, *, rng: np.random.Generator | None = None
                 ) -> None:
        self._setup = setup
        self._sum = np.zeros(setup.layout.length, dtype=np.float64)
        self._count = 0
        self._rng = np.random.default_rng() if rng is None else rng
        self._sketches: dict[tuple[int, str], KllSketch] = {}
        self._strata = setup.strata.begin_round() if setup.strata is not None else None

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return _no_metrics(metrics)

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        report = _checked_report(self._setup, path)
        layout = self._setup.layout
        plan = layout.plan
        for version in plan.versions:
            n = int(report[layout.index(version, "", "examples")])
            if n == 0:  # a block this device did not fill
                continue
            for m in layout.sketched:
                assert plan.sketch is not None
                sketch = kll.parse_items(report[layout.sketch_slice(version, m)], n,
                                         k=plan.sketch.k)
                key = (version, m.name)
                held = self._sketches.get(key)
                self._sketches[key] = (sketch if held is None
                                       else kll.merge([held, sketch], rng=self._rng))
        self._sum += np.where(layout.sketch_mask, 0.0, report)
        self._count += 1

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        raise InvalidRequest("this task does not use secure aggregation")

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """The summaries of the exact sums, and the quantiles of the merged sketches."""
        if not self._count:
            raise ReleaseRefused("no evaluation report arrived")
        metrics = _results(self._setup, self._sum, self._sketches)
        if self._setup.strata is not None and self._strata is not None:
            metrics.update(self._setup.strata.metrics(self._strata))
        return Aggregate(_NO_UPDATE, metrics)


class CentralDpEvaluation:
    """Central DP on clear reports: the noised sum of unit-scaled reports."""

    metrics_policy = MetricsPolicy.WITHHELD

    def __init__(self, setup: EvaluationSetup, privacy: TaskPrivacy, noise: NoiseSource, *,
                 require_secure_noise: bool) -> None:
        self._setup = setup
        self._privacy = privacy
        self._noise = noise
        self._require_secure = require_secure_noise
        self._scale = report_scale(setup.layout, secagg_clip=None,
                                   dp_l2_clip_norm=privacy.clip)
        self._sum = ClippedSum(setup.layout.length, l2_clip_norm=privacy.clip)

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return _no_metrics(metrics)

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        report = _checked_report(self._setup, path)
        self._sum.add(self._setup.layout.to_unit(report) * self._scale)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        raise InvalidRequest("this task does not use secure aggregation")

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """The summaries of the noised sums and the accounting metrics; nothing per device."""
        assert draw is not None, "a DP round always has a recorded draw"
        return _dp_release(self._setup, self._privacy, self._sum.total, self._scale, draw,
                           self._noise, self._require_secure, {})


class SecureEvaluation:
    """Masked unit-scaled reports; the coordinator learns only their (quantized) sum. Vector
    layout: the unit report times :func:`~core.evaluation.report.report_scale`, then the
    weight coordinate (devices encode with the weight cap as their count, so every report
    weighs the same)."""

    def __init__(self, setup: EvaluationSetup, secure: SecureRound, privacy: TaskPrivacy | None,
                 noise: NoiseSource, *, require_secure_noise: bool) -> None:
        self._setup = setup
        self.secure = secure
        self._privacy = privacy
        self._noise = noise
        self._require_secure = require_secure_noise
        params = secure.plan.params
        self._scale = report_scale(setup.layout, secagg_clip=params.clip,
                                   dp_l2_clip_norm=privacy.clip if privacy else None)
        self.metrics_policy = (MetricsPolicy.WITHHELD if privacy is not None
                               else MetricsPolicy.MASKED)

    @property
    def vector_length(self) -> int:
        return self._setup.layout.length + 1

    def check_upload(self, metrics: Mapping[str, float]) -> dict[str, float]:
        raise InvalidRequest("this task uses secure aggregation: reports go through the "
                             "SecAgg stages, never in the clear")

    def add_upload(self, path: Path, num_examples: int, metrics: Mapping[str, float], *,
                   scale: float = 1.0) -> None:
        self.check_upload(metrics)

    def add_masked(self, device: str, vector: RingVector, clipped: int) -> None:
        if len(vector) != self.vector_length:
            raise InvalidRequest(
                f"masked input has {len(vector)} values; this evaluation's report encodes to "
                f"{self.vector_length} ({self._setup.layout.length} report values and the "
                f"weight)")
        if clipped < 0 or clipped > len(vector):
            raise InvalidRequest(f"clipped_values {clipped} is not a count of coordinates")
        self.secure.masked_input(device, vector, clipped)

    def release(self, draw: CohortDraw | None) -> Aggregate:
        """Without DP: the summaries of the decoded sums, each mean's quantization error
        bound and the protocol's public facts. With DP: the noised release as in
        :class:`CentralDpEvaluation`, and the public facts."""
        try:
            decoded = decode_sum(self.secure)
        except ValueError as exc:
            raise ReleaseRefused(f"the unmasked sum cannot be decoded: {exc}") from None
        params, survivors, public = decoded.params, decoded.survivors, decoded.public
        # Every device encoded weight = cap.
        scaled_sum = decoded.mean * (decoded.weight / params.weight_cap)
        layout = self._setup.layout
        if self._privacy is None:
            sums = layout.from_unit(scaled_sum / self._scale)
            step = 2 * params.clip / (2**params.value_bits - 1)
            errors = sum_error_bounds(layout, devices=survivors, step=step, scale=self._scale)
            bounds = {f"{name}_bound": b for name, b in
                      mean_error_bounds(layout, sums, errors).items()}
            return Aggregate(_NO_UPDATE, {**_results(self._setup, sums), **bounds, **public})
        assert draw is not None, "a DP round always has a recorded draw"
        return _dp_release(self._setup, self._privacy, scaled_sum, self._scale, draw,
                           self._noise, self._require_secure, public)


def _dp_release(setup: EvaluationSetup, privacy: TaskPrivacy, scaled_sum: np.ndarray,
                scale: float, draw: CohortDraw, noise: NoiseSource, require_secure: bool,
                public: Mapping[str, float]) -> Aggregate:
    """Noises the sum of the scaled unit reports (sensitivity: the clip norm) through the
    task's privacy, and releases the summaries of the rescaled noisy sums."""
    try:
        release = privacy.release(scaled_sum, None, draw=draw, source=noise,
                                  require_secure=require_secure)
    except PrivacyError as exc:
        raise ReleaseRefused(f"differential privacy refused the release: {exc}") from None
    # TaskPrivacy divides the noised sum by the expected reports (a mean update); undone.
    noisy = np.asarray(release.mean, dtype=np.float64) * privacy.expected_reports
    sums = setup.layout.from_unit(noisy / scale)
    return Aggregate(_NO_UPDATE, {**release.metrics, **_results(setup, sums), **public},
                     release)


def begin_evaluation(setup: EvaluationSetup, *, privacy: TaskPrivacy | None,
                     secure: SecureRound | None, noise: NoiseSource,
                     require_secure_noise: bool) -> Aggregator:
    """The aggregator of a new evaluation round.

    Raises:
        ValueError: a plan with sketches under secure aggregation or DP (never made by
            :func:`~coordinator.rounds.evaluation_tasks.evaluation_setup`).
    """
    if setup.layout.plan.sketch is not None and (secure is not None or privacy is not None):
        raise ValueError("per-example sketches travel only in clear reports, without DP")
    if secure is not None:
        return SecureEvaluation(setup, secure, privacy, noise,
                                require_secure_noise=require_secure_noise)
    if privacy is not None:
        return CentralDpEvaluation(setup, privacy, noise,
                                   require_secure_noise=require_secure_noise)
    return PlainEvaluation(setup)
