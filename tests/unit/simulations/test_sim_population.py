"""simulation.population.load per_round: a device's data exist only while a round that
admitted it runs, and training gives what load: all gives for the same devices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.types import AggregationMode, LocalTraining, ModelSpec
from simulations.config import (
    DataConfig,
    Distribution,
    DistributionKind,
    EngineConfig,
    HeterogeneityConfig,
    PopulationLoad,
    SelectionConfig,
    SimulationConfig,
    parse_simulation_yaml,
    validate_simulation_config,
)
from simulations.engine import Simulation
from simulations.errors import SimulationConfigError
from simulations.population import EVALUATION_DEVICES, OnDemandPopulation

SYNTHETIC = "synthetic:alpha=1,beta=1"


def _config(devices: int, per_round: int, *, load: PopulationLoad, rounds: int = 2,
            train_loss_samples: int = 20000) -> SimulationConfig:
    return SimulationConfig(
        name="population", rounds=rounds,
        model=ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10}),
        data=DataConfig(SYNTHETIC, num_devices=devices, load=load),
        selection=SelectionConfig(clients_per_round=per_round, over_selection=1.5,
                                  round_deadline_s=20, keep_partial_work=True),
        heterogeneity=HeterogeneityConfig(
            speed=Distribution(DistributionKind.LOGNORMAL, mu=3.0, sigma=1.0),
            availability=Distribution(DistributionKind.UNIFORM, low=0.5, high=1.0),
            straggler_fraction=0.3, dropout=0.1),
        local=LocalTraining(epochs=2, batch_size=10, learning_rate=0.05))


def test_per_round_trains_the_same_model_as_holding_every_device() -> None:
    held = Simulation(_config(30, 6, load=PopulationLoad.ALL))
    on_demand = Simulation(_config(30, 6, load=PopulationLoad.PER_ROUND))
    for a, b in zip(held.rounds(), on_demand.rounds(), strict=True):
        assert (a.admitted, a.used, a.partial, a.stragglers, a.dropped_out) == (
            b.admitted, b.used, b.partial, b.stragglers, b.dropped_out)
        assert a.local_loss == pytest.approx(b.local_loss, rel=1e-9)
    for name in held.params:
        np.testing.assert_array_equal(on_demand.params[name], held.params[name])


def test_only_the_evaluation_sample_and_admitted_devices_are_generated() -> None:
    # 100,000 devices: load: all would generate every one before the first round.
    config = _config(100_000, 20, load=PopulationLoad.PER_ROUND, train_loss_samples=0)
    sim = Simulation(config)
    assert sim.population is not None
    assert sim.population.generated == EVALUATION_DEVICES
    admitted = 0
    for metrics in sim.rounds():
        assert metrics.committed
        admitted += metrics.admitted * metrics.attempts
        assert sim.population.held == 0  # the round's data are gone once it is over
    assert admitted >= 2 * config.selection.admitted
    assert sim.population.generated == EVALUATION_DEVICES + admitted
    assert sim.num_devices == 100_000


def test_the_evaluation_sample_is_seeded_and_sized_by_train_loss_samples() -> None:
    data = DataConfig(SYNTHETIC, num_devices=5000, load=PopulationLoad.PER_ROUND)
    small = OnDemandPopulation(data, seed=1, evaluation_examples=0)
    assert small.evaluation.num_devices == EVALUATION_DEVICES
    again = OnDemandPopulation(data, seed=1, evaluation_examples=0)
    np.testing.assert_array_equal(small.evaluation.x_test, again.evaluation.x_test)
    large = OnDemandPopulation(data, seed=1, evaluation_examples=60_000)
    assert large.evaluation.num_devices > EVALUATION_DEVICES
    assert int(large.evaluation.sizes().sum()) >= 60_000
    # The devices of a population smaller than the floor are all in it.
    few = OnDemandPopulation(dataclasses.replace(data, num_devices=7), evaluation_examples=0)
    assert few.evaluation.num_devices == 7


def test_fedctl_simulates_a_per_round_population_in_process() -> None:
    from simulations.modes import build_simulation

    sim, close = build_simulation(_config(500, 5, load=PopulationLoad.PER_ROUND, rounds=1))
    try:
        assert sim.population is not None and sim.num_devices == 500
        assert [m.committed for m in sim.rounds()] == [True]
    finally:
        close()


def test_a_cohort_table_holds_the_devices_rows_in_job_order() -> None:
    population = OnDemandPopulation(DataConfig(SYNTHETIC, num_devices=50,
                                               load=PopulationLoad.PER_ROUND))
    table = population.table([7, 3])
    from core.data.spec import load_dataset

    for i, device in enumerate([7, 3]):
        expected = load_dataset(f"{SYNTHETIC},shard={device}/50")
        x, y = table.device_arrays(i)
        np.testing.assert_array_equal(x, expected.x_train)
        np.testing.assert_array_equal(y, expected.y_train)


def test_a_task_file_asks_for_per_round_loading() -> None:
    text = f"""
name: big
model: {{architecture: logistic_regression, arguments: {{input_dim: 60, num_classes: 10}}}}
rounds: 1
clients_per_round: 10
over_selection: 1.0
min_reports: 1
simulation:
  population: {{devices: 100000, data: "{SYNTHETIC}", load: per_round}}
"""
    assert parse_simulation_yaml(text).data.load is PopulationLoad.PER_ROUND
    with pytest.raises(SimulationConfigError,
                       match=r"t.yaml: field 'simulation.population.load'"):
        parse_simulation_yaml(text.replace("load: per_round", "load: lazy"), source="t.yaml")
    with pytest.raises(SimulationConfigError,
                       match=r"'simulation.population.load': per_round does not run "
                             r"simulation.experiment"):
        parse_simulation_yaml(text + "  experiment: {arms: []}\n", source="t.yaml")


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: dataclasses.replace(c, engine=EngineConfig(processes=2)),
     "not in simulation.engine.processes"),
    (lambda c: dataclasses.replace(c, aggregation=dataclasses.replace(
        c.aggregation, mode=AggregationMode.ASYNC, buffer=2, max_concurrency=4),
        selection=dataclasses.replace(c.selection, round_deadline_s=0),
        heterogeneity=HeterogeneityConfig()),
     "synchronous rounds only"),
])
def test_what_per_round_does_not_run_is_refused_naming_the_field(change, message) -> None:  # type: ignore[no-untyped-def]
    config = change(_config(100, 10, load=PopulationLoad.PER_ROUND))
    with pytest.raises(SimulationConfigError,
                       match=rf"field 'simulation.population.load': .*{message}"):
        validate_simulation_config(config)
