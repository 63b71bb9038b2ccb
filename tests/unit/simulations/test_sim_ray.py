"""--ray: a cohort split across Ray actors gives the in-process result (one local node)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.types import LocalTraining, ModelSpec
from simulations.config import (
    DataConfig,
    EngineConfig,
    SelectionConfig,
    SimulationConfig,
)
from simulations.engine import Simulation

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'ray==2.*')")

pytestmark = pytest.mark.slow  # starts a local Ray node


def test_a_simulation_over_ray_matches_the_in_process_one(make_federation) -> None:  # type: ignore[no-untyped-def]
    from simulations.ray_backend import RayCohortTrainer

    config = SimulationConfig(
        name="ray", model=ModelSpec("logistic_regression", {"input_dim": 6, "num_classes": 3}),
        data=DataConfig("synthetic:alpha=1,beta=1", num_devices=8), rounds=2,
        selection=SelectionConfig(clients_per_round=5),
        local=LocalTraining(epochs=2, batch_size=5, learning_rate=0.1),
        engine=EngineConfig(workers=2))
    data = make_federation([5, 12, 30, 8, 19, 3, 25, 10])
    local_sim = Simulation(config, data=data)
    list(local_sim.rounds())
    trainer = RayCohortTrainer("local", config, data,
                               init_kwargs={"num_cpus": 2, "object_store_memory": 80 << 20})
    try:
        ray_sim = Simulation(dataclasses.replace(config), data=data, trainer=trainer)
        list(ray_sim.rounds())
    finally:
        trainer.shutdown()
        ray.shutdown()
    for name in local_sim.params:
        np.testing.assert_allclose(ray_sim.params[name], local_sim.params[name], rtol=1e-6)
