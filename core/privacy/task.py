"""Central differential privacy of a task's rounds (DP-FedAvg, McMahan et al., ICLR 2018),
with adaptive clipping (Andrew et al., NeurIPS 2021), accounting and the budget.

Per round, as the paper's pseudocode::

    devices:      Delta_i <- clip(Delta_i, C)              (device_agent.runtime.device)
    coordinator:  S       <- sum_i Delta_i                  (clear, or unmasked SecAgg sum)
                  S~      <- S + N(0, (z_Delta C)^2)        (release)
                  mean    <- S~ / selection_target          (a fixed denominator)
                  adaptive: b~ <- (sum_i b_i + N(0, sigma_b^2)) / selection_target,
                            C  <- C exp(-eta (b~ - gamma))
                  epsilon <- accountant(history of (z, the draw selection made))

Every device has weight 1 (an example count would let one device's influence exceed C).
With adaptive clipping the update's multiplier z_Delta is raised so that update and bit count
together cost one Gaussian mechanism of multiplier z (the paper's Theorem 1), so the
accountant sees z for every round.

Accounting reads what selection did
-----------------------------------
Each committed round is analysed as one sampled Gaussian mechanism with the sampling its
selection *performed*, recorded as a :class:`core.sampling.CohortDraw` (kind, eligible devices
seen, cohort drawn, population used, q) and stored with the round:

* ``sampling: fixed`` (the default, and what the coordinator does): a uniform subset of the
  distinct eligible devices that checked in during the selection window, of fixed size
  ``selection_target`` (no first-come cap, no late admission under DP), analysed with
  dp-accounting's RDP accountant for ``SampledWithoutReplacementDpEvent`` under *replace-one*
  adjacency with n = min(population, eligible seen) and the cohort size actually drawn;
* ``sampling: poisson``: each distinct eligible device of the window independently with
  probability p = selection_target / population (Opacus RDP or PRV, add/remove-one); the
  coordinator samples exactly that way.

The released sum is over *every* report of the sampled cohort (a cohort is never cut by report
order: under DP a round waits for all its admitted devices, or its deadline); a device that
drops out contributes nothing, which is within its clipped contribution, so dropouts need no
change to the analysis. The sum is divided by the fixed, public ``selection_target``.

A round that failed released nothing and costs nothing. Before a round opens, the epsilon it
would reach with the planned draw is checked against the budget; when its selection closes,
the epsilon with the draw it actually made is checked again (fewer devices seen means a larger
q), and a round that would exceed the budget is failed before any device trains.

Budget: ``max_epsilon`` (``target_epsilon`` when that is what the task set); no round opens
or proceeds past it, and the task ends in :attr:`~core.types.TaskState.BUDGET_EXHAUSTED`.

Asynchronous tasks (FedBuff)
----------------------------
Under ``aggregation.mode: async`` nobody is sampled: devices check in when they can and are
seated while seats are free. Each committed version is one release: the buffer's ``K``
clipped updates, each scaled by its staleness weight ``w(s) <= 1`` (weight 1 otherwise),
summed, noised once with std ``z C`` and divided by the fixed ``K`` (``buffer``). The
accountant is told every version is a draw of the *whole* population (q = 1, fixed size,
replace-one): no amplification by sampling is claimed, so the epsilon holds however devices
time their check-ins. What it assumes, and what the coordinator enforces:

* a device contributes at most one update to a version's buffer (it is told to come back
  once the version commits);
* *when* a device reports (hence which buffer takes its update, its staleness weight and
  how many uploads are rejected as late) does not depend on its data: it is a matter of the
  device's speed and availability. Replace-one adjacency swaps one device's data for
  another's under the same schedule, so a buffer's sum moves by at most ``2 w C <= 2C``;
  a schedule that leaked the data (say, training time proportional to a private example
  count) is outside the analysis.

``reports``, ``admitted`` and the staleness metrics a version records are facts of that
schedule and are released; no device metric or example count is.

Not thread-safe (used from the service's event loop).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.privacy.accounting import (
    MechanismSteps,
    Sampling,
    calibrate_noise,
    epsilon_of_history,
)
from core.privacy.adaptive_clipping import update_clip_norm, update_noise_multiplier
from core.privacy.distributed import check_noise_floor
from core.privacy.noise import NoiseSource, gaussian_noise
from core.privacy.spec import AdaptiveClip, FixedClip, PrivacyMode, PrivacySpec
from core.protocol import PlanPrivacy
from core.sampling import CohortDraw
from core.types import AggregationMode, TaskSpec

#: Round metrics written with every committed DP round.
EPSILON_METRIC = "dp_epsilon"
NOISE_METRIC = "dp_noise_multiplier"
CLIP_METRIC = "dp_clip"
NEXT_CLIP_METRIC = "dp_next_clip"
#: The round's draw (see :class:`core.sampling.CohortDraw`), stored so a restarted
#: coordinator accounts exactly what was done.
SAMPLING_RATE_METRIC = "dp_sampling_rate"
POPULATION_METRIC = "dp_population"
COHORT_METRIC = "dp_cohort"
ELIGIBLE_METRIC = "dp_eligible"


@dataclass(frozen=True)
class Release:
    """A round's privatized mean update and the metrics to commit with it; :meth:`
    TaskPrivacy.committed` applies ``next_clip`` once the commit is durable."""

    mean: npt.NDArray[np.float32]
    metrics: Mapping[str, float]
    next_clip: float
    #: The multiplier this release carried (distributed DP: what the reports' shares add up to).
    noise_multiplier: float
    #: The sampling the round's selection performed.
    draw: CohortDraw


@dataclass(frozen=True)
class PrivacyStatus:
    """What a task has spent and may spend, for its status: epsilon at ``delta`` over the
    committed rounds, the budget, and the sampling its last committed round performed."""

    epsilon: float
    delta: float
    budget: float
    sampling: Sampling
    rounds_accounted: int
    last_draw: CohortDraw | None


class TaskPrivacy:
    """The central-DP state of one task: the clip norm, the noise multiplier and, for each
    committed round, the multiplier it released with and the draw its selection made."""

    def __init__(self, task: TaskSpec, *, noise_multiplier: float, clip: float,
                 history: Sequence[tuple[float, CohortDraw]] = ()) -> None:
        privacy = task.privacy
        assert privacy is not None and privacy.population is not None
        assert privacy.delta is not None and privacy.clip is not None
        assert privacy.budget is not None, "a DP task always has a budget (spec parsing)"
        self.spec: PrivacySpec = privacy
        self.delta: float = privacy.delta
        self.population: int = privacy.population
        self.budget: float = privacy.budget
        #: Under DP every admitted device's report is summed: the sum's fixed denominator
        #: and the devices that share distributed noise are the whole sampled cohort (an
        #: asynchronous task: the buffer).
        self.asynchronous = task.aggregation.mode is AggregationMode.ASYNC
        self.expected_reports = (task.aggregation.buffer if self.asynchronous
                                 else task.selection_target)
        self.planned_draw = planned_draw(task)
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.history: list[tuple[float, CohortDraw]] = list(history)
        adaptive = privacy.clip if isinstance(privacy.clip, AdaptiveClip) else None
        self.adaptive = adaptive
        self.update_noise_multiplier = (
            noise_multiplier if adaptive is None else update_noise_multiplier(
                noise_multiplier=noise_multiplier, bit_noise_std=adaptive.bit_noise_std))
        #: Distributed DP: devices add the noise (in the secure-aggregation ring); the
        #: coordinator only checks how much arrived. ``distributed_noise_steps`` is set once
        #: the ring is known (the total std in quantization steps).
        self.distributed = privacy.mode is PrivacyMode.DISTRIBUTED
        self.min_noise_multiplier = privacy.min_noise_multiplier or 0.0
        self.distributed_noise_steps: float | None = None

    @classmethod
    def for_task(cls, task: TaskSpec, history: Sequence[Mapping[str, float]] = ()
                 ) -> TaskPrivacy | None:
        """The state of a central-DP task (None for other modes), given the metrics of its
        committed rounds (oldest first) after a restart.

        Raises:
            ValueError: ``target_epsilon`` unreachable for the planned rounds, or (adaptive
                clipping) a calibrated multiplier too large for the bit noise.
        """
        privacy = task.privacy
        if privacy is None or privacy.mode not in (PrivacyMode.CENTRAL, PrivacyMode.DISTRIBUTED):
            return None
        assert privacy.population is not None and privacy.delta is not None
        plan = planned_draw(task)
        z = privacy.noise_multiplier
        if z is None:
            assert privacy.target_epsilon is not None
            z = calibrate_noise(
                target_epsilon=privacy.target_epsilon, sampling_rate=plan.sampling_rate,
                steps=task.rounds, delta=privacy.delta, method=privacy.accounting,
                sampling=privacy.sampling, population=plan.population)
        clip = (privacy.clip.l2_clip_norm if isinstance(privacy.clip, FixedClip)
                else privacy.clip.initial_l2_clip_norm if privacy.clip is not None else math.nan)
        past = [(m[NOISE_METRIC], _recorded_draw(m, plan)) for m in history
                if NOISE_METRIC in m]
        if history and NEXT_CLIP_METRIC in history[-1]:
            clip = history[-1][NEXT_CLIP_METRIC]
        return cls(task, noise_multiplier=z, clip=clip, history=past)

    def epsilon(self, extra: Sequence[tuple[float, CohortDraw]] = ()) -> float:
        """Epsilon (at ``delta``) of the committed rounds plus the ``extra`` (multiplier,
        draw) rounds."""
        runs: dict[tuple[float, CohortDraw], int] = {}
        for item in [*self.history, *extra]:
            runs[item] = runs.get(item, 0) + 1
        steps = [_mechanism(z, draw, n) for (z, draw), n in runs.items()]
        return epsilon_of_history(steps, delta=self.delta, method=self.spec.accounting,
                                  sampling=self.spec.sampling, population=self.population)

    def next_round_exceeds_budget(self) -> tuple[bool, float]:
        """(whether one more round with the planned draw would spend more than the budget,
        epsilon after it): checked before a round opens. Distributed DP counts the next
        round at the floor: the least noise it may release."""
        after = self.epsilon([(self._worst_multiplier(), self.planned_draw)])
        return after > self.budget, after

    def draw_exceeds_budget(self, draw: CohortDraw) -> tuple[bool, float]:
        """The same check with the draw a round's selection actually made (checked when its
        selection closes, before any device trains)."""
        after = self.epsilon([(self._worst_multiplier(), draw)])
        return after > self.budget, after

    def status(self) -> PrivacyStatus:
        return PrivacyStatus(
            epsilon=self.epsilon(), delta=self.delta, budget=self.budget,
            sampling=self.spec.sampling, rounds_accounted=len(self.history),
            last_draw=self.history[-1][1] if self.history else None)

    def _worst_multiplier(self) -> float:
        return (max(self.min_noise_multiplier, 1e-9) if self.distributed
                else self.noise_multiplier)

    def plan(self) -> PlanPrivacy:
        return PlanPrivacy(l2_clip_norm=self.clip, report_unclipped=self.adaptive is not None,
                           distributed_noise_steps=self.distributed_noise_steps,
                           devices_planned=self.expected_reports if self.distributed else 0)

    def release_distributed(self, total: npt.NDArray[np.floating], reports: int,
                            draw: CohortDraw) -> Release:
        """The mean of a sum that already carries the reporting devices' noise shares.

        Raises:
            NoiseFloorError: the ``reports`` devices' shares add up to a multiplier below
                ``min_noise_multiplier``; the sum must not be released.
        """
        z = check_noise_floor(noise_multiplier=self.noise_multiplier,
                              devices_planned=self.expected_reports,
                              devices_reported=min(reports, self.expected_reports),
                              min_noise_multiplier=self.min_noise_multiplier)
        mean = np.asarray(total, dtype=np.float64).reshape(-1) / self.expected_reports
        metrics = {
            **self._round_metrics(z, draw),
            NEXT_CLIP_METRIC: self.clip,
            "dp_planned_noise_multiplier": self.noise_multiplier,
        }
        return Release(mean.astype(np.float32), metrics, self.clip, z, draw)

    def release(self, total: npt.NDArray[np.floating], unclipped: float | None, *,
                draw: CohortDraw, source: NoiseSource, require_secure: bool) -> Release:
        """Noises the sum of the round's clipped updates (weight 1 each) and, under adaptive
        clipping, the count of unclipped updates; divides by the expected number of reports.

        Raises:
            InsecureNoiseError: a seeded ``source`` while ``require_secure``.
        """
        if require_secure:
            source.require_secure("central DP noise")
        flat = np.asarray(total, dtype=np.float64).reshape(-1)
        noisy = gaussian_noise(flat.size, stddev=self.update_noise_multiplier * self.clip,
                               source=source)
        noisy += flat
        noisy /= self.expected_reports
        next_clip = self.clip
        metrics = self._round_metrics(self.noise_multiplier, draw)
        if self.adaptive is not None:
            count = 0.0 if unclipped is None else unclipped
            noisy_count = count + float(gaussian_noise(1, stddev=self.adaptive.bit_noise_std,
                                                       source=source)[0])
            fraction = noisy_count / self.expected_reports
            next_clip = update_clip_norm(
                l2_clip_norm=self.clip, unclipped_fraction=fraction,
                target_quantile=self.adaptive.target_quantile,
                learning_rate=self.adaptive.learning_rate)
            metrics["dp_unclipped_fraction"] = fraction
        metrics[NEXT_CLIP_METRIC] = next_clip
        return Release(noisy.astype(np.float32), metrics, next_clip, self.noise_multiplier, draw)

    def committed(self, release: Release) -> None:
        """Records a committed release: its round counts towards epsilon from now on."""
        self.history.append((release.noise_multiplier, release.draw))
        self.clip = release.next_clip

    def _round_metrics(self, z: float, draw: CohortDraw) -> dict[str, float]:
        return {
            EPSILON_METRIC: self.epsilon([(z, draw)]),
            NOISE_METRIC: z,
            CLIP_METRIC: self.clip,
            "dp_delta": self.delta,
            "dp_budget": self.budget,
            SAMPLING_RATE_METRIC: draw.sampling_rate,
            POPULATION_METRIC: float(draw.population),
            COHORT_METRIC: float(draw.cohort),
            ELIGIBLE_METRIC: float(draw.eligible),
        }


def status_of_records(task: TaskSpec, history: Sequence[Mapping[str, float]]
                      ) -> PrivacyStatus | None:
    """The status of a task that is not running, read from its committed rounds' metrics
    (oldest first) without recomputing anything: the epsilon the last release recorded was
    computed over the whole history. None without central or distributed DP."""
    privacy = task.privacy
    if privacy is None or privacy.mode not in (PrivacyMode.CENTRAL, PrivacyMode.DISTRIBUTED):
        return None
    assert privacy.delta is not None and privacy.budget is not None
    accounted = [m for m in history if NOISE_METRIC in m]
    last = accounted[-1] if accounted else None
    return PrivacyStatus(
        epsilon=last[EPSILON_METRIC] if last else 0.0, delta=privacy.delta,
        budget=privacy.budget, sampling=privacy.sampling, rounds_accounted=len(accounted),
        last_draw=_recorded_draw(last, planned_draw(task)) if last else None)


def planned_draw(task: TaskSpec) -> CohortDraw:
    """The draw a DP round makes when the whole configured population checks in: the
    ``selection_target`` devices of ``population`` (fixed size), or each with probability
    selection_target / population (Poisson). An asynchronous task samples nobody: every
    version is accounted as a draw of the whole population (fixed size, q = 1)."""
    privacy = task.privacy
    assert privacy is not None and privacy.population is not None
    if task.aggregation.mode is AggregationMode.ASYNC:
        n = privacy.population
        return CohortDraw(Sampling.FIXED_SIZE, n, n, n, 1.0)
    n, k = privacy.population, min(task.selection_target, privacy.population)
    return CohortDraw(privacy.sampling, n, k, n, k / n)


def _recorded_draw(metrics: Mapping[str, float], plan: CohortDraw) -> CohortDraw:
    """The draw stored with a committed round (rounds from before draws were recorded: the
    rate they were accounted at, over the configured population)."""
    rate = metrics.get(SAMPLING_RATE_METRIC, plan.sampling_rate)
    if COHORT_METRIC not in metrics:
        k = min(plan.population, max(1, round(rate * plan.population)))
        return CohortDraw(plan.kind, plan.population, k, plan.population, rate)
    return CohortDraw(plan.kind, int(metrics.get(ELIGIBLE_METRIC, 0)),
                      int(metrics[COHORT_METRIC]), int(metrics[POPULATION_METRIC]), rate)


def _mechanism(z: float, draw: CohortDraw, steps: int) -> MechanismSteps:
    if draw.kind is Sampling.FIXED_SIZE:
        return MechanismSteps(z, draw.sampling_rate, steps, population=draw.population,
                              sample_size=max(1, draw.cohort))
    return MechanismSteps(z, draw.sampling_rate, steps)
