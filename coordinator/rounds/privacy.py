"""Central differential privacy of a task's rounds (DP-FedAvg, McMahan et al., ICLR 2018),
with adaptive clipping (Andrew et al., NeurIPS 2021), accounting and the budget.

Per round, as the paper's pseudocode::

    devices:      Delta_i <- clip(Delta_i, C)              (device_agent.runtime.device)
    coordinator:  S       <- sum_i Delta_i                  (clear, or unmasked SecAgg sum)
                  S~      <- S + N(0, (z_Delta C)^2)        (release)
                  mean    <- S~ / clients_per_round         (a fixed denominator)
                  adaptive: b~ <- (sum_i b_i + N(0, sigma_b^2)) / clients_per_round,
                            C  <- C exp(-eta (b~ - gamma))
                  epsilon <- accountant(history of z, q = clients_per_round / population)

Every device has weight 1 (an example count would let one device's influence exceed C).
With adaptive clipping the update's multiplier z_Delta is raised so that update and bit count
together cost one Gaussian mechanism of multiplier z (the paper's Theorem 1), so the
accountant sees z for every round.

Accounting and the coordinator's selection
-------------------------------------------
The accountant analyses each committed round as a sampled Gaussian mechanism with sampling
rate ``q = clients_per_round / population`` over the task's stated population:

* ``sampling: fixed`` (what the coordinator does): a uniformly random subset of fixed size
  without replacement, analysed with dp-accounting's RDP accountant for
  ``SampledWithoutReplacementDpEvent`` under *replace-one* adjacency. The coordinator admits
  a uniform sample of the devices that checked in during the selection window, and the
  round uses the first ``clients_per_round`` reports, so when every device of the population
  checks in each window and reports in an order independent of its data, each device's
  update is included with probability q. The analysis is only as good as those assumptions
  (availability that depends on the data, or a population larger than what checks in,
  breaks amplification by sampling): the ``population`` must be the number of devices that
  actually check in, not a larger nominal one.
* ``sampling: poisson``: each device independently with probability q (Opacus RDP or PRV,
  add/remove-one). The coordinator does not sample that way; the Poisson analysis is offered
  for comparison with the literature and simulations and is an approximation here.

A round that failed released nothing and costs nothing. Fewer reports than
``clients_per_round`` do not change the sensitivity (C) nor the noise, only the utility.

Budget: before each round opens, the epsilon the task would have after it is computed; if it
exceeds ``max_epsilon`` (else ``target_epsilon``), no round opens and the task ends in
:attr:`~core.types.TaskState.BUDGET_EXHAUSTED`, so no model past the budget is ever released.

Not thread-safe (used from the service's event loop).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.privacy.accounting import MechanismSteps, calibrate_noise, epsilon_of_history
from core.privacy.adaptive_clipping import update_clip_norm, update_noise_multiplier
from core.privacy.distributed import check_noise_floor
from core.privacy.noise import NoiseSource, gaussian_noise
from core.privacy.spec import AdaptiveClip, FixedClip, PrivacyMode, PrivacySpec
from core.protocol import PlanPrivacy
from core.types import TaskSpec

#: Round metrics written with every committed DP round.
EPSILON_METRIC = "dp_epsilon"
NOISE_METRIC = "dp_noise_multiplier"
CLIP_METRIC = "dp_clip"
NEXT_CLIP_METRIC = "dp_next_clip"


@dataclass(frozen=True)
class Release:
    """A round's privatized mean update and the metrics to commit with it; :meth:`
    TaskPrivacy.committed` applies ``next_clip`` once the commit is durable."""

    mean: npt.NDArray[np.float32]
    metrics: Mapping[str, float]
    next_clip: float
    #: The multiplier this release carried (distributed DP: what the reports' shares add up to).
    noise_multiplier: float


class TaskPrivacy:
    """The central-DP state of one task: the clip norm, the noise multiplier and the
    multipliers of the rounds committed so far."""

    def __init__(self, task: TaskSpec, *, noise_multiplier: float, clip: float,
                 history: Sequence[float] = ()) -> None:
        privacy = task.privacy
        assert privacy is not None and privacy.population is not None
        assert privacy.delta is not None and privacy.clip is not None
        self.spec: PrivacySpec = privacy
        self.delta: float = privacy.delta
        self.population: int = privacy.population
        self.expected_reports = task.clients_per_round
        self.sampling_rate = task.clients_per_round / privacy.population
        self.noise_multiplier = noise_multiplier
        self.clip = clip
        self.history: list[float] = list(history)
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
        z = privacy.noise_multiplier
        if z is None:
            assert privacy.target_epsilon is not None
            z = calibrate_noise(
                target_epsilon=privacy.target_epsilon,
                sampling_rate=task.clients_per_round / privacy.population, steps=task.rounds,
                delta=privacy.delta, method=privacy.accounting, sampling=privacy.sampling,
                population=privacy.population)
        clip = (privacy.clip.l2_clip_norm if isinstance(privacy.clip, FixedClip)
                else privacy.clip.initial_l2_clip_norm if privacy.clip is not None else math.nan)
        past = [m[NOISE_METRIC] for m in history if NOISE_METRIC in m]
        if history and NEXT_CLIP_METRIC in history[-1]:
            clip = history[-1][NEXT_CLIP_METRIC]
        return cls(task, noise_multiplier=z, clip=clip, history=past)

    @property
    def budget(self) -> float | None:
        return self.spec.budget

    def epsilon(self, extra_rounds: int = 0, next_multiplier: float | None = None) -> float:
        """Epsilon (at ``delta``) of the committed rounds plus ``extra_rounds`` more at
        ``next_multiplier`` (default: the task's)."""
        runs: dict[float, int] = {}
        z_next = self.noise_multiplier if next_multiplier is None else next_multiplier
        for z in [*self.history, *[z_next] * extra_rounds]:
            runs[z] = runs.get(z, 0) + 1
        steps = [MechanismSteps(z, self.sampling_rate, n) for z, n in runs.items()]
        return epsilon_of_history(steps, delta=self.delta, method=self.spec.accounting,
                                  sampling=self.spec.sampling, population=self.population)

    def next_round_exceeds_budget(self) -> tuple[bool, float]:
        """(whether one more round would spend more than the budget, epsilon after it).
        Distributed DP counts the next round at the floor: the least noise it may release."""
        worst = (max(self.min_noise_multiplier, 1e-9) if self.distributed
                 else self.noise_multiplier)
        after = self.epsilon(extra_rounds=1, next_multiplier=worst)
        return (self.budget is not None and after > self.budget), after

    def plan(self) -> PlanPrivacy:
        return PlanPrivacy(l2_clip_norm=self.clip, report_unclipped=self.adaptive is not None,
                           distributed_noise_steps=self.distributed_noise_steps,
                           devices_planned=self.expected_reports if self.distributed else 0)

    def release_distributed(self, total: npt.NDArray[np.floating], reports: int) -> Release:
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
            EPSILON_METRIC: self.epsilon(extra_rounds=1, next_multiplier=z),
            NOISE_METRIC: z,
            CLIP_METRIC: self.clip,
            NEXT_CLIP_METRIC: self.clip,
            "dp_delta": self.delta,
            "dp_sampling_rate": self.sampling_rate,
            "dp_planned_noise_multiplier": self.noise_multiplier,
        }
        return Release(mean.astype(np.float32), metrics, self.clip, z)

    def release(self, total: npt.NDArray[np.floating], unclipped: float | None, *,
                source: NoiseSource, require_secure: bool) -> Release:
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
        metrics = {
            EPSILON_METRIC: self.epsilon(extra_rounds=1),
            NOISE_METRIC: self.noise_multiplier,
            CLIP_METRIC: self.clip,
            "dp_delta": self.delta,
            "dp_sampling_rate": self.sampling_rate,
        }
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
        return Release(noisy.astype(np.float32), metrics, next_clip, self.noise_multiplier)

    def committed(self, release: Release) -> None:
        """Records a committed release: its round counts towards epsilon from now on."""
        self.history.append(release.noise_multiplier)
        self.clip = release.next_clip
