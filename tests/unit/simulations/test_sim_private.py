"""Simulations with secure aggregation and central DP run the coordinator's own protocol
and privacy code: the secure model equals the plain one within the quantization bound, DP
rounds carry the accountant's epsilon, the budget stops the run where the coordinator would
stop the task, and settings the coordinator would refuse are refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from core.privacy import epsilon
from core.privacy.spec import PrivacySpec, privacy_from_dict
from core.types import LocalTraining, ModelSpec, SecAggProtocol, SecureAggregation, TaskState
from simulations.config import (
    DataConfig,
    Distribution,
    DistributionKind,
    EvaluationConfig,
    HeterogeneityConfig,
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


# -- the privacy budget, checked when the coordinator checks it -----------------------------

def _central(**changes: object) -> PrivacySpec:
    return privacy_from_dict({"mode": "central", "noise_multiplier": 1.0, "delta": 1e-5,
                              "clip": 1.0, "population": 8, "sampling": "fixed",
                              "max_epsilon": 1e6, **changes}, "t")


def _every_device_epsilon(rounds: int) -> float:
    """Epsilon of ``rounds`` rounds that each draw all 8 of 8 devices (q = 1, replace-one:
    the Gaussian mechanism of sensitivity 2C, so multiplier z / 2)."""
    return epsilon(noise_multiplier=1.0 / 2, sampling_rate=1.0, steps=rounds, delta=1e-5)


def test_a_simulation_ends_before_a_round_that_would_pass_the_budget(
    make_federation,  # type: ignore[no-untyped-def]
) -> None:
    budget = (_every_device_epsilon(2) + _every_device_epsilon(3)) / 2
    config = _config(rounds=5, privacy=_central(max_epsilon=budget),
                     evaluation=EvaluationConfig(every=10))
    sim = Simulation(config, data=make_federation(SIZES))
    metrics = list(sim.rounds())
    assert [m.round for m in metrics] == [1, 2] and all(m.committed for m in metrics)
    assert sim.outcome.state is TaskState.BUDGET_EXHAUSTED
    assert "privacy budget exhausted after 2 rounds" in sim.outcome.reason
    assert [m.epsilon for m in metrics] == pytest.approx(
        [_every_device_epsilon(1), _every_device_epsilon(2)], rel=1e-9)
    assert sim.privacy is not None and sim.privacy.epsilon() <= budget
    # The last committed model is the final one: evaluated, though no evaluation was due.
    assert [m.test_accuracy is not None for m in metrics] == [False, True]


def test_a_simulation_within_its_budget_completes(
    make_federation,  # type: ignore[no-untyped-def]
) -> None:
    config = _config(rounds=2, privacy=_central(max_epsilon=_every_device_epsilon(2) * (1 + 1e-6)))
    sim = Simulation(config, data=make_federation(SIZES))
    assert len(list(sim.rounds())) == 2
    assert (sim.outcome.state, sim.outcome.reason) == (TaskState.COMPLETED, "")


def test_a_draw_from_fewer_devices_than_planned_fails_the_round_before_anyone_trains(
    make_federation,  # type: ignore[no-untyped-def]
) -> None:
    # The budget fits one round drawing 4 of the 8 devices; with half of them offline the
    # draw is 4 of fewer (a larger q), so every attempt fails when its selection closes.
    private = _config(rounds=1, privacy=_central(),
                      selection=SelectionConfig(clients_per_round=4, max_failed_attempts=3))
    probe = Simulation(private, data=make_federation(SIZES))
    assert probe.privacy is not None
    _, one_round = probe.privacy.next_round_exceeds_budget()
    budget = _central(max_epsilon=one_round * (1 + 1e-9))
    half_online = HeterogeneityConfig(
        availability=Distribution(DistributionKind.CONSTANT, value=0.5))
    starved = Simulation(dataclasses.replace(private, privacy=budget, heterogeneity=half_online),
                         data=make_federation(SIZES))
    metrics = list(starved.rounds())
    assert len(metrics) == 1 and not metrics[0].committed and metrics[0].attempts == 3
    assert starved.outcome.state is TaskState.FAILED
    assert "eligible devices checked in" in starved.outcome.reason
    assert starved.privacy is not None and starved.privacy.history == []
    everyone = Simulation(dataclasses.replace(private, privacy=budget),
                          data=make_federation(SIZES))
    assert [m.committed for m in everyone.rounds()] == [True]


def test_adaptive_clipping_follows_the_devices_unclipped_bits(
    make_federation,  # type: ignore[no-untyped-def]
) -> None:
    # Every update is far below the initial clip of 100: all bits say "unclipped", the
    # fraction is above the target quantile, and the clip shrinks.
    adaptive = _central(clip={"target_quantile": 0.5, "initial": 100.0, "learning_rate": 0.2,
                              "bit_noise": 1.0})
    sim = Simulation(_config(rounds=1, privacy=adaptive), data=make_federation(SIZES))
    list(sim.rounds())
    assert sim.privacy is not None and sim.privacy.clip < 100.0
