"""Simulations with secure aggregation and central DP run the coordinator's own protocol
and privacy code: the secure model equals the plain one within the quantization bound, DP
rounds carry the accountant's epsilon, and settings the coordinator would refuse are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.privacy.spec import privacy_from_dict
from core.types import LocalTraining, ModelSpec, SecAggProtocol, SecureAggregation
from simulations.config import (
    DataConfig,
    SelectionConfig,
    SimulationConfig,
    SimulationConfigError,
    parse_simulation_yaml,
    validate_simulation_config,
)
from simulations.engine import Simulation

LINEAR = ModelSpec("logistic_regression", {"input_dim": 6, "num_classes": 3})
SECURE = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.7, dropout=0.001,
                           clip=0.5)
SIZES = [5, 12, 30, 8, 19, 3, 25, 10]


def _config(**changes: object) -> SimulationConfig:
    base = SimulationConfig(
        name="tiny", model=LINEAR, data=DataConfig("synthetic:alpha=1,beta=1", num_devices=8),
        rounds=3, selection=SelectionConfig(clients_per_round=8),
        local=LocalTraining(epochs=2, batch_size=5, learning_rate=0.1))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _run(config: SimulationConfig, data):  # type: ignore[no-untyped-def]
    sim = Simulation(config, data=data)
    metrics = list(sim.rounds())
    return sim.params, metrics


def test_secure_aggregation_gives_the_plain_model_within_quantization_error(
    make_federation,  # type: ignore[no-untyped-def]
) -> None:
    data = make_federation(SIZES)
    plain, _ = _run(_config(), data)
    secure, _ = _run(_config(secure_aggregation=SECURE), data)
    for name in plain:
        np.testing.assert_allclose(secure[name], plain[name], atol=1e-4)


def test_central_dp_reports_a_growing_epsilon_and_noises_the_model(
    make_federation,  # type: ignore[no-untyped-def]
) -> None:
    data = make_federation(SIZES)
    privacy = privacy_from_dict({"mode": "central", "noise_multiplier": 1.0, "delta": 1e-5,
                                 "clip": 1.0, "population": 8, "sampling": "fixed",
                                 "max_epsilon": 1e6}, "t")
    plain, _ = _run(_config(), data)
    private, metrics = _run(_config(privacy=privacy, secure_aggregation=SECURE), data)
    eps = [m.epsilon for m in metrics]
    assert all(e is not None for e in eps) and eps == sorted(eps) and eps[0] > 0  # type: ignore[type-var]
    assert not np.allclose(private["linear.weight"], plain["linear.weight"], atol=1e-3)


def test_settings_the_coordinator_would_refuse_are_refused_naming_the_field() -> None:
    yaml_text = """
name: x
model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
rounds: 1
clients_per_round: 8
min_reports: 1
over_selection: 1.0
simulation: {population: {devices: 8, data: "synthetic:alpha=1,beta=1"}}
"""
    with pytest.raises(SimulationConfigError, match="secure_aggregation.*a \\+ 2d <= 0.9"):
        parse_simulation_yaml(yaml_text + "secure_aggregation: {dropout: 0.45}\n",
                              source="s.yaml")
    with pytest.raises(SimulationConfigError, match="privacy.mode"):
        parse_simulation_yaml(yaml_text + "privacy: {mode: local, local: {noise_multiplier: 1,"
                              " max_grad_norm: 1, delta: 1.0e-5, max_epsilon: 9}}\n",
                              source="s.yaml")
    config = _config(secure_aggregation=SECURE)
    validate_simulation_config(config, source="s.yaml")
