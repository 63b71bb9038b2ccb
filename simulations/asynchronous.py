"""Asynchronous buffered aggregation (FedBuff: Nguyen et al., AISTATS 2022; Papaya: Huba
et al., MLSys 2022) on the simulated clock of :mod:`simulations.devices`.

    sim = make_simulation(config)     # simulations.modes; config.aggregation.mode is async
    for metrics in sim.rounds():      # one RoundMetrics per committed model version
        ...

The server, as in the papers' pseudocode::

    keep max_concurrency devices training (a freed slot is refilled at once by an idle
    device drawn uniformly among those online, each online with its availability)
    on each upload (in order of simulated arrival):
        s = version_now - version_trained_on          # staleness
        if s > max_staleness: reject as late
        else: buffer += weight(s) * delta             # weight(s) = (1 + s) ** -exponent
        when the buffer holds `buffer` uploads:
            mean = sum(n_i weight(s_i) delta_i) / sum(n_i)      # core's weighted_mean
            step the server optimizer along mean (core.aggregation.server_optimizers)
            commit version_now + 1; evaluate as the synchronous engine does

What it assumes (as :mod:`simulations.devices`): a device's upload arrives ``latency_s +
full_steps * batch_size / speed`` simulated seconds after it was handed the model; it always
does its full ``local.epochs`` (no deadline, no stragglers: asynchronous training has no
round to cut short); it vanishes with probability ``dropout`` at a uniform point of that
time, and then reports nothing. Staleness divides nothing away: a buffer of uploads that are
all stale moves the model less than a fresh one (FedBuff's ``sum / K``). Evaluation takes
no simulated time. ``rounds`` counts committed versions.

``device_s`` in the metrics is device-seconds of local training whose result reached the
server (accepted or rejected as stale; dropouts count nothing), as the synchronous engine
counts its aggregated devices' training, so the two modes compare on compute.

Central DP (``privacy: {mode: central}``), as the coordinator runs it
(:mod:`core.privacy.task`, "Asynchronous tasks"): a version's mean is instead
``(sum_i w(s_i) clip(delta_i, C) + N(0, (z C)^2)) / buffer`` (every device weight 1, no
example count), released by the coordinator's ``TaskPrivacy`` and accounted as a draw of the
whole population (q = 1, replace-one: no amplification). Before each version the budget is
checked with that draw; when one more version would pass it the run ends
(``outcome`` BUDGET_EXHAUSTED). Noise is seeded: simulations must be reproducible.

Deterministic in the config's seed. Devices that start on the same version are trained
together, one batch per version, when the first of them uploads.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.aggregation.fedavg import weighted_mean
from core.aggregation.server_optimizers import apply_server_optimizer
from core.aggregation.staleness import staleness_weight
from core.privacy.noise import NoiseSource
from core.privacy.task import EPSILON_METRIC
from core.types import Aggregation, TaskState
from simulations.aggregation import unflatten
from simulations.central_dp import release_buffer, task_privacy
from simulations.cohort import CohortTrainer, DeviceJob, full_steps
from simulations.config import PopulationLoad, SimulationConfig
from simulations.data import FederatedData
from simulations.engine import Outcome, RoundMetrics, Simulation, device_seed

State = dict[str, np.ndarray]

__all__ = ["AsyncSimulation", "staleness_weight"]

#: Seconds an empty slot waits before it draws again when no idle device is online.
_RETRY_S = 1.0


@dataclass
class _Launch:
    """A device handed version ``version`` at ``start_s``."""

    index: int
    device: int
    version: int
    start_s: float
    train_s: float
    dropped: bool


@dataclass
class _Upload:
    delta: State
    num_examples: int
    loss: float
    staleness: int


class AsyncSimulation(Simulation):
    """FedBuff on the simulated clock (the module docstring). Built like
    :class:`~simulations.engine.Simulation`; ``rounds`` yields one :class:`RoundMetrics` per
    committed version. Not thread-safe."""

    def __init__(self, config: SimulationConfig, *, trainer: CohortTrainer | None = None,
                 data: FederatedData | None = None) -> None:
        if config.data.load is PopulationLoad.PER_ROUND:
            raise ValueError("simulation.population.load per_round runs synchronous rounds "
                             "only")
        super().__init__(config, trainer=trainer, data=data)
        #: Most devices training at once over the run (the ``max_concurrency`` bound).
        self.peak_concurrency = 0
        self.privacy = task_privacy(
            name=config.name, model=config.model, rounds=config.rounds,
            clients_per_round=config.selection.clients_per_round, privacy=config.privacy,
            aggregation=config.aggregation)
        self._noise = NoiseSource.seeded(config.seed)
        self._epsilon: float | None = None

    def rounds(self, count: int | None = None) -> Iterator[RoundMetrics]:
        """Runs until ``count`` versions (default: the config's ``rounds``) are committed,
        yielding each version's metrics; fewer when (central DP) the next version would
        pass the budget (:attr:`outcome`)."""
        total = self.config.rounds if count is None else count
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.engine.threads)
        self.outcome = Outcome(TaskState.RUNNING)
        try:
            yield from self._run(total)
        finally:
            torch.set_num_threads(threads)

    def _run(self, total: int) -> Iterator[RoundMetrics]:
        config, agg = self.config, self.config.aggregation
        local, profiles = config.local, self.profiles
        n_devices = self.data.num_devices
        concurrency = min(agg.max_concurrency, n_devices)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xA5C]))
        start = time.perf_counter()
        busy = np.zeros(n_devices, dtype=bool)
        # (arrival_s, launch index, launch); a launch of None is an empty slot's retry.
        events: list[tuple[float, int, _Launch | None]] = []
        snapshots: dict[int, State] = {0: self.params}
        untrained: dict[int, list[_Launch]] = {}
        trained: dict[int, _Upload] = {}
        buffer: list[_Upload] = []
        version, launches, retries = 0, 0, 0
        last_commit_s = 0.0
        counts = {"admitted": 0, "dropped_out": 0, "late": 0, "available": 0}
        device_s = 0.0

        def fill(now: float) -> None:
            nonlocal launches, retries
            while int(busy.sum()) < concurrency:
                online = np.flatnonzero((rng.random(n_devices) < profiles.availability) & ~busy)
                counts["available"] = len(online)
                if not len(online):
                    retries += 1
                    heapq.heappush(events, (now + _RETRY_S, -retries, None))
                    return
                device = int(online[rng.integers(len(online))])
                steps = full_steps(int(self.table.sizes[device]), local)
                train_s = steps * local.batch_size / max(float(profiles.speed[device]), 1e-12)
                duration = float(profiles.latency_s[device]) + train_s
                dropped = bool(rng.random() < profiles.dropout[device])
                arrival = now + (duration * float(rng.random()) if dropped else duration)
                launch = _Launch(launches, device, version, now, train_s, dropped)
                launches += 1
                busy[device] = True
                counts["admitted"] += 1
                if not dropped:
                    untrained.setdefault(version, []).append(launch)
                heapq.heappush(events, (arrival, launch.index, launch))
            self.peak_concurrency = max(self.peak_concurrency, int(busy.sum()))

        if total and self._stop_if_budget_exhausted(committed=0):
            return
        fill(0.0)
        while version < total:
            if not events:  # every device dropped out and nobody is online: cannot happen
                self.outcome = Outcome(TaskState.FAILED, "no device left to train")
                return      # with a retry pending; kept as a guard against a silent hang
            now, _, launch = heapq.heappop(events)
            self.sim_time_s = now
            if launch is None:
                fill(now)
                continue
            busy[launch.device] = False
            if launch.dropped:
                counts["dropped_out"] += 1
                fill(now)
                continue
            if launch.index not in trained:
                self._train_version(launch.version, untrained, snapshots, trained, version)
            upload = trained.pop(launch.index)
            upload.staleness = version - launch.version
            device_s += launch.train_s
            if upload.staleness > agg.max_staleness:
                counts["late"] += 1
            else:
                buffer.append(upload)
            if len(buffer) >= agg.buffer:
                self.params = self._commit(buffer, agg)
                if version not in untrained:
                    snapshots.pop(version, None)
                version += 1
                snapshots[version] = self.params
                stopping = version < total and self._stop_if_budget_exhausted(committed=version)
                evaluate_now = (version % config.evaluation.every == 0 or version == total
                                or stopping)
                scores: tuple[float | None, ...] = (None, None, None)
                metrics: dict[str, float] = {}
                if evaluate_now:
                    scores = self.evaluate()
                    metrics = self.app_metrics()
                losses = [(u.loss, u.num_examples) for u in buffer if not math.isnan(u.loss)]
                local_loss = (float(np.average([x for x, _ in losses],
                                               weights=[w for _, w in losses]))
                              if losses else None)
                yield RoundMetrics(
                    round=version, committed=True, available=counts["available"],
                    admitted=counts["admitted"], used=len(buffer), partial=0, stragglers=0,
                    dropped_out=counts["dropped_out"], late=counts["late"],
                    round_time_s=now - last_commit_s, sim_time_s=now,
                    wall_s=time.perf_counter() - start, local_loss=local_loss,
                    train_loss=scores[0], test_loss=scores[1], test_accuracy=scores[2],
                    epsilon=self._epsilon, metrics=metrics, device_s=device_s)
                buffer = []
                last_commit_s, device_s = now, 0.0
                counts = {**dict.fromkeys(counts, 0), "available": counts["available"]}
                if stopping:
                    return
            fill(now)
        self.outcome = Outcome(TaskState.COMPLETED)

    def _train_version(self, version: int, untrained: dict[int, list[_Launch]],
                       snapshots: dict[int, State], trained: dict[int, _Upload],
                       current: int) -> None:
        """Trains every not yet trained device that started on ``version``, in one batch."""
        batch = untrained.pop(version)
        start = snapshots[version] if version != current else self.params
        if version != current:
            snapshots.pop(version, None)
        jobs = [DeviceJob(lc.device, device_seed(self.config.seed, lc.index, lc.device))
                for lc in batch]
        result = self.trainer.train({n: torch.from_numpy(v) for n, v in start.items()}, jobs)
        for i, lc in enumerate(batch):
            delta = {n: result.params[n][i].numpy() - x for n, x in start.items()}
            trained[lc.index] = _Upload(delta, int(result.num_examples[i]),
                                        float(result.loss[i]), 0)

    def _commit(self, buffer: Sequence[_Upload], agg: Aggregation) -> State:
        """FedBuff's server step over a full buffer (central DP: over its release)."""
        scale = [staleness_weight(u.staleness, agg.staleness) for u in buffer]
        if self.privacy is not None:
            mean = self._private_mean(buffer, scale)
        else:
            weights = [float(u.num_examples) for u in buffer]
            mean = {name: weighted_mean([u.delta[name] * s for u, s in zip(buffer, scale,
                                                                           strict=True)],
                                        weights)
                    for name in self.params}
        new_params, self.algorithm.server_state = apply_server_optimizer(
            self.params, mean, self.config.server, self.algorithm.server_state)
        return new_params

    def _private_mean(self, buffer: Sequence[_Upload], scale: Sequence[float]) -> State:
        """The version's DP release (:func:`simulations.central_dp.release_buffer`),
        committed to the accountant at once: the simulated version always commits."""
        assert self.privacy is not None
        names = list(self.params)
        flat = [np.concatenate([np.asarray(u.delta[n], dtype=np.float64).reshape(-1)
                                for n in names]) for u in buffer]
        release = release_buffer(self.privacy, flat, scale, source=self._noise)
        self.privacy.committed(release)
        self._epsilon = float(release.metrics[EPSILON_METRIC])
        return unflatten(release.mean, self.params)
