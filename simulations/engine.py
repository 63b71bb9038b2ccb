"""The simulation loop: plan a round on the simulated clock, train the devices whose work
counts, aggregate with the coordinator's code, evaluate, report.

    sim = Simulation(load_simulation_file("task.yaml"))
    for metrics in sim.rounds():      # one RoundMetrics per round, as it finishes
        ...

Everything is deterministic in the config's seeds (selection, availability, dropouts,
stragglers, shuffles, initial weights), whichever trainer runs the cohort.

How the run ended is :attr:`Simulation.outcome`, in the coordinator's task states: completed
(all rounds committed), failed (a round's every attempt failed) or, under central DP,
budget_exhausted: the budget is checked when the coordinator checks it
(:mod:`simulations.central_dp`), so no round runs that would take epsilon past it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.models import build_model, initial_state, load_numpy_state, model_hooks
from core.privacy.task import TaskPrivacy
from core.training import evaluate, evaluate_metrics
from core.types import AggregationMode, RobustKind, TaskState
from simulations.aggregation import CohortAggregator
from simulations.algorithms import FederatedAlgorithm, make_algorithm
from simulations.central_dp import budget_exhausted, draw_refusal, selection_draw
from simulations.cohort import CohortTrainer, DeviceJob, DeviceTable, make_trainer
from simulations.config import PopulationLoad, SimulationConfig
from simulations.data import FederatedData, load_federated_data
from simulations.devices import DeviceProfiles, RoundPlan, device_profiles, plan_round
from simulations.errors import SimulationConfigError
from simulations.population import OnDemandCohortTrainer, OnDemandPopulation


@dataclass(frozen=True)
class RoundMetrics:
    """One round. Counts are devices; times are simulated seconds except ``wall_s`` (real
    seconds since the simulation started). Losses are mean cross-entropy in nats (the app's
    loss for a model that brings one); the evaluation fields are None on rounds that were
    not evaluated, ``local_loss`` when no device completed its epochs. ``metrics``: the
    app's metrics of the global model on the test set (evaluated rounds only)."""

    round: int
    committed: bool
    available: int
    admitted: int
    used: int
    partial: int
    stragglers: int
    dropped_out: int
    late: int
    round_time_s: float
    sim_time_s: float
    wall_s: float
    local_loss: float | None
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    #: Central DP: the accountant's epsilon after this round (None without DP).
    epsilon: float | None = None
    #: Attempts this round took: failed ones (fewer than ``min_reports``) are redone; the
    #: counts above are the last attempt's, ``round_time_s`` covers them all.
    attempts: int = 1
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: Device-seconds of local training whose result reached the server this round (the
    #: aggregated devices' steps x batch_size / speed; asynchronous: accepted or stale),
    #: to compare modes on device compute.
    device_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Outcome:
    """How a simulation ended, as the coordinator would leave the task: ``state`` is
    RUNNING while rounds are being yielded (and after a caller stopped early), then
    COMPLETED, FAILED or BUDGET_EXHAUSTED; ``reason`` says why it is not COMPLETED."""

    state: TaskState
    reason: str = ""


def device_seed(seed: int, round_index: int, device: int) -> int:
    """The shuffling seed of ``device`` in ``round_index``."""
    return int(np.random.SeedSequence([seed, round_index, device]).generate_state(1)[0])


class Simulation:
    """A federation built from ``config``; ``trainer`` replaces the configured engine (e.g.
    :class:`simulations.ray_backend.RayCohortTrainer`). Not thread-safe.

    Raises:
        ValueError: a privacy ``target_epsilon`` unreachable in the task's rounds.
    """

    def __init__(self, config: SimulationConfig, *, trainer: CohortTrainer | None = None,
                 data: FederatedData | None = None,
                 population: OnDemandPopulation | None = None) -> None:
        self.config = config
        #: ``load: per_round``: the devices whose data are generated when admitted (built
        #: here unless given, e.g. shared with a Ray trainer); None with ``load: all``.
        self.population = population
        if config.data.load is PopulationLoad.PER_ROUND:
            if data is not None:
                raise ValueError("simulation.population.load per_round: the devices' data "
                                 "are generated round by round, not passed in (build the "
                                 "simulation with simulations.modes.build_simulation)")
            if population is None:
                population = self.population = OnDemandPopulation(
                    config.data, source=config.source, seed=config.seed,
                    evaluation_examples=config.evaluation.train_loss_samples)
            #: The data held for the whole run: every device's (``load: all``), or the
            #: evaluation sample's (``per_round``).
            self.data = population.evaluation
            self._sizes: np.ndarray | Sequence[int] = population.sizes
        elif population is not None:
            raise ValueError("population= is for simulation.population.load per_round")
        else:
            self.data = data if data is not None else load_federated_data(
                config.data, source=config.source)
        check_data_schema(config, self.data)
        self.table = DeviceTable(self.data)
        #: Devices in the population (``data.num_devices`` with ``load: all``).
        self.num_devices = self.data.num_devices
        if population is None:
            self._sizes = self.table.sizes
        else:
            self.num_devices = population.num_devices
        self.profiles: DeviceProfiles = device_profiles(
            config.heterogeneity, self.num_devices, seed=config.seed,
            base_dir=config.base_dir)
        aggregator = None
        robust = config.aggregation.robust
        # The asynchronous engine aggregates its buffers itself (simulations.asynchronous).
        if config.aggregation.mode is AggregationMode.SYNC and (
                config.secure_aggregation is not None or config.privacy is not None
                or robust.kind is not RobustKind.MEAN):
            aggregator = CohortAggregator(
                model=config.model, rounds=config.rounds,
                clients_per_round=config.selection.clients_per_round, seed=config.seed,
                secure_aggregation=config.secure_aggregation, privacy=config.privacy,
                robust=robust)
        self.aggregator = aggregator
        #: Central DP: the coordinator's privacy state (epsilon spent, the budget).
        self.privacy: TaskPrivacy | None = aggregator.privacy if aggregator is not None else None
        #: How the run ended (:class:`Outcome`); RUNNING until :meth:`rounds` is done.
        self.outcome = Outcome(TaskState.RUNNING)
        self._failure = ""  # why the last round's last attempt failed, when it is known
        self.algorithm: FederatedAlgorithm = make_algorithm(
            config.algorithm, config.server, num_devices=self.num_devices,
            learning_rate=config.local.learning_rate, aggregator=aggregator)
        if trainer is not None:
            self.trainer = trainer
        elif population is not None:
            self.trainer = OnDemandCohortTrainer(
                population, config.engine.kind, config.model, config.local,
                self.algorithm.local_objective(), threads=config.engine.threads)
        else:
            self.trainer = make_trainer(
                config.engine.kind, config.model, self.table, config.local,
                self.algorithm.local_objective(), threads=config.engine.threads)
        self.params = initial_state(config.model, config.seed)
        self._eval_model = build_model(config.model)
        self._hooks = model_hooks(config.model.architecture)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xE7A1]))
        total = int(self.table.pad_row)
        take = min(total, config.evaluation.train_loss_samples)
        self._train_sample = np.sort(rng.choice(total, size=take, replace=False))
        self.sim_time_s = 0.0

    def rounds(self, count: int | None = None) -> Iterator[RoundMetrics]:
        """Runs ``count`` rounds (default: the config's), yielding each round's metrics;
        fewer when a round fails or (central DP) the next one would pass the budget
        (:attr:`outcome` says which)."""
        total = self.config.rounds if count is None else count
        threads = torch.get_num_threads()
        torch.set_num_threads(self.config.engine.threads)
        start = time.perf_counter()
        self.outcome = Outcome(TaskState.RUNNING)
        try:
            if total and self._stop_if_budget_exhausted(committed=0):
                return
            for r in range(1, total + 1):
                metrics = self.run_round(r, evaluate_now=(r % self.config.evaluation.every == 0
                                                          or r == total), start=start)
                stopping = (metrics.committed and r < total
                            and self._stop_if_budget_exhausted(committed=r))
                if stopping and metrics.test_accuracy is None:
                    metrics = self.with_evaluation(metrics)  # the final model is this one
                yield metrics
                if not metrics.committed:  # every attempt failed: the task would fail
                    self.outcome = Outcome(TaskState.FAILED, self._failure or (
                        f"round {r}: {self.config.selection.max_failed_attempts} attempts "
                        "failed"))
                    return
                if stopping:
                    return
            self.outcome = Outcome(TaskState.COMPLETED)
        finally:
            torch.set_num_threads(threads)

    def _stop_if_budget_exhausted(self, *, committed: int) -> bool:
        """The coordinator's check before a round opens: True (and :attr:`outcome` is
        BUDGET_EXHAUSTED) when one more round with the planned draw would pass the privacy
        budget. ``committed``: rounds committed so far."""
        if self.privacy is None:
            return False
        reason = budget_exhausted(self.privacy, committed=committed)
        if reason is None:
            return False
        self.outcome = Outcome(TaskState.BUDGET_EXHAUSTED, reason)
        return True

    def run_round(self, round_index: int, *, evaluate_now: bool = True,
                  start: float | None = None) -> RoundMetrics:
        config = self.config
        t0 = time.perf_counter() if start is None else start
        round_time = 0.0
        self._failure = ""
        for attempt in range(1, config.selection.max_failed_attempts + 1):
            plan = plan_round(round_index, profiles=self.profiles, sizes=self._sizes,
                              selection=config.selection, local=config.local,
                              straggler_fraction=config.heterogeneity.straggler_fraction,
                              seed=config.seed, attempt=attempt)
            refusal = self._refuse_draw(plan)
            if refusal is not None:
                # Failed when its selection closed: nobody trained, nothing was accounted.
                self._failure = f"round {round_index}, attempt {attempt}: {refusal}"
                plan = dataclasses.replace(plan, used=(), dropped_out=0, stragglers=0, late=0,
                                           committed=False, duration_s=0.0)
                continue
            round_time += plan.duration_s
            if plan.committed:
                break
        if plan.committed and self.aggregator is not None:
            self.aggregator.begin_round(available=plan.available, admitted=len(plan.admitted))
        local_loss = self._train(round_index, plan) if plan.committed else None
        if self.population is not None:
            self.population.end_round()
        self.sim_time_s += round_time
        scores: tuple[float | None, ...] = (None, None, None)
        metrics: dict[str, float] = {}
        if evaluate_now:
            scores = self.evaluate()
            metrics = self.app_metrics()
        return RoundMetrics(
            round=round_index, committed=plan.committed, available=plan.available,
            admitted=len(plan.admitted), used=len(plan.used) if plan.committed else 0,
            partial=plan.partial if plan.committed else 0, stragglers=plan.stragglers,
            dropped_out=plan.dropped_out, late=plan.late, round_time_s=round_time,
            sim_time_s=self.sim_time_s, wall_s=time.perf_counter() - t0,
            local_loss=local_loss, train_loss=scores[0], test_loss=scores[1],
            test_accuracy=scores[2],
            epsilon=self.aggregator.epsilon if self.aggregator is not None else None,
            attempts=attempt, metrics=metrics,
            device_s=self._device_s(plan) if plan.committed else 0.0)

    def _refuse_draw(self, plan: RoundPlan) -> str | None:
        """Central DP: why the draw this attempt's selection made would pass the budget
        (fewer devices online than the population: a larger q), else None."""
        if self.privacy is None:
            return None
        draw = selection_draw(self.privacy, available=plan.available,
                              admitted=len(plan.admitted))
        return draw_refusal(self.privacy, draw)

    def _device_s(self, plan: RoundPlan) -> float:
        batch = self.config.local.batch_size
        return float(sum(w.steps * batch / max(float(self.profiles.speed[w.device]), 1e-12)
                         for w in plan.used))

    def _train(self, round_index: int, plan: RoundPlan) -> float | None:
        devices = [w.device for w in plan.used]
        jobs = [DeviceJob(w.device, device_seed(self.config.seed, round_index, w.device),
                          None if w.complete else w.steps) for w in plan.used]
        global_tensors = {n: torch.from_numpy(v) for n, v in self.params.items()}
        result = self.trainer.train(global_tensors, jobs,
                                    self.algorithm.corrections(self.params, devices))
        self.params = self.algorithm.server_update(self.params, devices, result)
        done = ~np.isnan(result.loss)
        if not done.any():
            return None
        return float(np.average(result.loss[done], weights=result.num_examples[done]))

    def with_evaluation(self, metrics: RoundMetrics) -> RoundMetrics:
        """``metrics`` with the current global model's evaluation filled in."""
        train_loss, test_loss, accuracy = self.evaluate()
        return dataclasses.replace(metrics, train_loss=train_loss, test_loss=test_loss,
                                   test_accuracy=accuracy, metrics=self.app_metrics())

    def evaluate(self) -> tuple[float | None, float, float]:
        """(loss on the training sample or None if empty, test loss, test accuracy) of the
        current global model."""
        load_numpy_state(self._eval_model, self.params)
        loss = self._hooks.loss
        train_loss = None
        if len(self._train_sample):
            x = self.table.x[self._train_sample].numpy()
            y = self.table.y[self._train_sample].numpy()
            train_loss, _ = evaluate(self._eval_model, x, y, loss=loss)
        test_loss, accuracy = evaluate(self._eval_model, self.data.x_test, self.data.y_test,
                                       loss=loss)
        return train_loss, test_loss, accuracy

    def app_metrics(self) -> dict[str, float]:
        """The app's metrics (its ``metrics`` hook) of the current global model on the test
        set; empty for a model without one."""
        if self._hooks.metrics is None:
            return {}
        load_numpy_state(self._eval_model, self.params)
        return evaluate_metrics(self._eval_model, self.data.x_test, self.data.y_test,
                                self._hooks.metrics)


def check_data_schema(config: SimulationConfig, data: FederatedData) -> None:
    """The task's ``data_schema``, when it declares one, fits the simulated devices' data
    (as the coordinator checks it against the schemas real devices report).

    Raises:
        SimulationConfigError: naming ``data_schema``'s field.
    """
    schema = config.data_schema
    if schema is None:
        return
    if tuple(schema.feature_shape) != data.feature_shape:
        raise SimulationConfigError(
            config.source, "data_schema.feature_shape",
            f"{list(schema.feature_shape)} does not fit the devices' data "
            f"({config.data.spec!r}: {list(data.feature_shape)})")
    if schema.num_classes != data.num_classes:
        raise SimulationConfigError(
            config.source, "data_schema.num_classes",
            f"{schema.num_classes} does not fit the devices' data ({config.data.spec!r}: "
            f"{data.num_classes} classes)")

