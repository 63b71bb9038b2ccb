"""Which engine runs a simulation, and how the two modes compare: synchronous rounds
(:class:`simulations.engine.Simulation`) or FedBuff
(:class:`simulations.asynchronous.AsyncSimulation`), each run to a target accuracy on the
same population (``simulation: {compare: ...}``, ``benchmarks/async.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from core.types import AggregationMode
from simulations.asynchronous import AsyncSimulation
from simulations.cohort import CohortTrainer
from simulations.config import PopulationLoad, SimulationConfig
from simulations.data import FederatedData, load_federated_data
from simulations.engine import RoundMetrics, Simulation
from simulations.population import OnDemandPopulation


def make_simulation(config: SimulationConfig, *, trainer: CohortTrainer | None = None,
                    data: FederatedData | None = None,
                    population: OnDemandPopulation | None = None) -> Simulation:
    """The engine for ``config``'s ``aggregation.mode``: synchronous rounds
    (:class:`Simulation`) or FedBuff (:class:`simulations.asynchronous.AsyncSimulation`)."""
    if config.aggregation.mode is AggregationMode.ASYNC:
        return AsyncSimulation(config, trainer=trainer, data=data)
    return Simulation(config, trainer=trainer, data=data, population=population)


def build_simulation(config: SimulationConfig, *, ray_address: str | None = None
                     ) -> tuple[Simulation, Callable[[], None]]:
    """The simulation ``fedctl simulate`` runs, with the function that releases its
    workers: in this process, in ``engine.processes`` local worker processes, or (with
    ``ray_address``, :mod:`simulations.ray_backend`) on a Ray cluster; a ``per_round``
    population's data are generated round by round on every backend.

    Raises:
        SimulationConfigError: the data are refused (naming the field).
        SimulationError: the worker processes do not start; ``BackendUnavailable``: Ray
            is missing or unreachable.
    """
    per_round = config.data.load is PopulationLoad.PER_ROUND
    if ray_address is None and config.engine.processes > 1:
        from simulations.cohort import DeviceTable
        from simulations.process_backend import ProcessCohortTrainer

        # Straight into shared memory: the workers map it, and it is never held twice.
        shared = load_federated_data(config.data, source=config.source, shared_memory=True)
        pool = ProcessCohortTrainer.from_config(config, DeviceTable(shared))
        try:
            return make_simulation(config, data=shared, trainer=pool), pool.shutdown
        except BaseException:
            pool.shutdown()
            raise
    if ray_address is None:
        return make_simulation(config), lambda: None
    from simulations.ray_backend import RayCohortTrainer

    population = OnDemandPopulation(
        config.data, source=config.source, seed=config.seed,
        evaluation_examples=config.evaluation.train_loss_samples) if per_round else None
    resident = None if per_round else load_federated_data(config.data, source=config.source)
    held = population if population is not None else resident
    assert held is not None
    trainer = RayCohortTrainer(ray_address, config, held)
    try:
        sim = make_simulation(config, data=resident, trainer=trainer, population=population)
    except BaseException:
        trainer.shutdown()
        raise
    return sim, trainer.shutdown


@dataclass(frozen=True)
class ToTarget:
    """How long a run took to first reach ``target`` test accuracy: simulated seconds,
    device-seconds of training, and rounds (versions); None fields when it never did."""

    mode: str
    target: float
    sim_time_s: float | None
    device_s: float | None
    rounds: int | None
    final_accuracy: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "target_accuracy": self.target,
                "sim_time_s": self.sim_time_s, "device_s": self.device_s,
                "rounds": self.rounds, "final_accuracy": self.final_accuracy}


def to_target(mode: str, history: Sequence[RoundMetrics], target: float) -> ToTarget:
    """The first evaluated round of ``history`` at or above ``target`` accuracy."""
    device_s = 0.0
    final = None
    for m in history:
        device_s += m.device_s
        if m.test_accuracy is not None:
            final = m.test_accuracy
            if m.test_accuracy >= target:
                return ToTarget(mode, target, m.sim_time_s, device_s, m.round, final)
    return ToTarget(mode, target, None, None, None, final)


def run_to_target(config: SimulationConfig, target: float, *,
                  data: FederatedData | None = None, rounds: int | None = None
                  ) -> tuple[ToTarget, list[RoundMetrics]]:
    """Runs ``config`` (either mode) until its test accuracy reaches ``target`` or its
    rounds are done."""
    sim = make_simulation(config, data=data)
    history: list[RoundMetrics] = []
    for m in sim.rounds(rounds):
        history.append(m)
        if m.test_accuracy is not None and m.test_accuracy >= target:
            break
    return to_target(config.aggregation.mode.value, history, target), history


def as_sync(config: SimulationConfig) -> SimulationConfig:
    """``config`` with synchronous rounds (``clients_per_round`` per round), all else kept:
    the baseline FedBuff is compared with."""
    return replace(config, aggregation=replace(config.aggregation, mode=AggregationMode.SYNC))


def compare_modes(config: SimulationConfig, target: float, *, data: FederatedData | None = None,
                  rounds: int | None = None) -> dict[str, Any]:
    """Runs ``config`` asynchronously and synchronously on the same population and returns
    each mode's :class:`ToTarget` and the speed-ups (sync / async; None if either missed)."""
    data = data if data is not None else load_federated_data(config.data, source=config.source)
    async_config = replace(config, aggregation=replace(config.aggregation,
                                                       mode=AggregationMode.ASYNC))
    results = {m.mode: m for m in (run_to_target(async_config, target, data=data,
                                                 rounds=rounds)[0],
                                   run_to_target(as_sync(config), target, data=data,
                                                 rounds=rounds)[0])}
    a, s = results["async"], results["sync"]
    return {
        "async": a, "sync": s,
        "time_speedup": (s.sim_time_s / a.sim_time_s
                         if a.sim_time_s and s.sim_time_s is not None else None),
        "compute_ratio": (a.device_s / s.device_s
                          if a.device_s is not None and s.device_s else None),
    }


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The comparison as a small table for people."""
    lines = [f"{'mode':<6} {'rounds':>7} {'sim time s':>11} {'device s':>11} "
             f"{'final acc':>9}"]
    for mode in ("async", "sync"):
        r: ToTarget = comparison[mode]
        lines.append(f"{mode:<6} {_fmt(r.rounds, 'd'):>7} {_fmt(r.sim_time_s, '.0f'):>11} "
                     f"{_fmt(r.device_s, '.0f'):>11} {_fmt(r.final_accuracy, '.4f'):>9}")
    target = comparison["async"].target
    speedup, ratio = comparison["time_speedup"], comparison["compute_ratio"]
    lines.append(f"to test accuracy {target}: async is "
                 + (f"{speedup:.2f}x faster in simulated time, " if speedup else
                    "not comparable in time (a mode missed the target), ")
                 + (f"using {ratio:.2f}x the device compute" if ratio else ""))
    return "\n".join(lines)


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
