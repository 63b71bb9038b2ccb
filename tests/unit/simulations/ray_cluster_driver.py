"""The driver of test_sim_ray_cluster.py, run in its own process (``python
tests/unit/simulations/ray_cluster_driver.py HEAD_ADDRESS``) so that the cluster's
authentication settings, which Ray reads once per process, never reach the test process.

For each population loading (all, per_round) it runs a small simulation in process and over
the Ray cluster at HEAD_ADDRESS, and prints one JSON line per run: the jobs each node's
actor trained and the largest difference between the two final models.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from core.types import LocalTraining, ModelSpec
from simulations.config import (
    DataConfig,
    EngineConfig,
    PopulationLoad,
    SelectionConfig,
    SimulationConfig,
)
from simulations.data import load_federated_data
from simulations.engine import Simulation
from simulations.population import OnDemandPopulation
from simulations.ray_backend import RayCohortTrainer

PER_ROUND = 5
ROUNDS = 2


def _config(load: PopulationLoad) -> SimulationConfig:
    return SimulationConfig(
        name="ray-cluster", rounds=ROUNDS,
        model=ModelSpec("logistic_regression", {"input_dim": 60, "num_classes": 10}),
        data=DataConfig("synthetic:alpha=1,beta=1", num_devices=12, load=load),
        selection=SelectionConfig(clients_per_round=PER_ROUND),
        local=LocalTraining(epochs=1, batch_size=10, learning_rate=0.05),
        engine=EngineConfig(workers=2))


def main(address: str) -> None:
    for load in (PopulationLoad.ALL, PopulationLoad.PER_ROUND):
        config = _config(load)
        population = data = None
        if load is PopulationLoad.PER_ROUND:
            population = OnDemandPopulation(config.data)
        else:
            data = load_federated_data(config.data)
        in_process = Simulation(config, data=data)
        list(in_process.rounds())
        held = population if population is not None else data
        assert held is not None
        trainer = RayCohortTrainer(address, config, held)
        try:
            on_ray = Simulation(config, data=data, population=population, trainer=trainer)
            list(on_ray.rounds())
            jobs = trainer.jobs_by_node()
        finally:
            trainer.shutdown()
        diff = max(float(np.abs(on_ray.params[n] - in_process.params[n]).max())
                   for n in in_process.params)
        print(json.dumps({"load": load.value, "jobs_by_node": jobs, "max_abs_diff": diff}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
