"""Asynchronous buffered aggregation (FedBuff) on the simulated clock, with central DP as
the coordinator runs it: clipped, staleness-weighted updates summed, noised once per version
and divided by the buffer; each version accounted as a release over the whole population."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch

from core.privacy import Sampling, epsilon
from core.privacy.clipping import l2_norm
from core.privacy.noise import NoiseSource
from core.privacy.spec import PrivacyMode, PrivacySpec, privacy_from_dict
from core.types import (
    Aggregation,
    AggregationMode,
    LocalTraining,
    ModelSpec,
    RobustAggregation,
    RobustKind,
    SecureAggregation,
    Staleness,
    StalenessKind,
    TaskState,
)
from simulations.asynchronous import AsyncSimulation, staleness_weight
from simulations.central_dp import release_buffer, task_privacy
from simulations.cohort import CohortResult, DeviceJob
from simulations.config import (
    AlgorithmConfig,
    AlgorithmKind,
    DataConfig,
    Distribution,
    DistributionKind,
    EvaluationConfig,
    HeterogeneityConfig,
    SelectionConfig,
    SimulationConfig,
    parse_simulation_yaml,
    validate_simulation_config,
)
from simulations.engine import Simulation
from simulations.errors import SimulationConfigError
from simulations.modes import compare_modes, make_simulation

LINEAR = ModelSpec("logistic_regression", {"input_dim": 6, "num_classes": 3})
SIZES = [5, 12, 30, 8, 19, 3, 25, 10, 14, 7, 22, 9, 16, 4, 11, 6, 28, 13, 20, 15]
HEAVY_TAIL = HeterogeneityConfig(
    speed=Distribution(DistributionKind.LOGNORMAL, mu=2.0, sigma=1.5),
    latency_s=Distribution(DistributionKind.UNIFORM, low=1.0, high=3.0))


def _config(**aggregation: object) -> SimulationConfig:
    agg = dataclasses.replace(Aggregation(mode=AggregationMode.ASYNC, buffer=3,
                                          max_concurrency=6), **aggregation)  # type: ignore[arg-type]
    return SimulationConfig(
        name="tiny-async", model=LINEAR,
        data=DataConfig("synthetic:alpha=1,beta=1", num_devices=len(SIZES)),
        rounds=8, selection=SelectionConfig(clients_per_round=3),
        local=LocalTraining(epochs=2, batch_size=5, learning_rate=0.1),
        heterogeneity=HEAVY_TAIL, aggregation=agg)


def test_polynomial_staleness_weight_is_one_over_root_of_one_plus_staleness() -> None:
    poly = Staleness(StalenessKind.POLYNOMIAL, exponent=0.5)
    assert staleness_weight(0, poly) == 1.0
    assert staleness_weight(3, poly) == pytest.approx(0.5)
    assert staleness_weight(8, Staleness(StalenessKind.POLYNOMIAL, exponent=1.0)) == \
        pytest.approx(1 / 9)
    assert staleness_weight(50, Staleness(StalenessKind.CONSTANT)) == 1.0
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1, poly)


def test_the_async_mode_gets_the_fedbuff_engine(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES)
    assert isinstance(make_simulation(_config(), data=data), AsyncSimulation)
    sync = dataclasses.replace(_config(), aggregation=Aggregation())
    assert type(make_simulation(sync, data=data)) is Simulation


def test_each_version_commits_exactly_buffer_uploads(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES)
    for buffer in (2, 4):
        history = list(make_simulation(_config(buffer=buffer), data=data).rounds())
        assert [m.round for m in history] == list(range(1, 9))
        assert all(m.used == buffer and m.committed for m in history)
    # a larger buffer waits for more uploads, so the same versions take longer
    small = list(make_simulation(_config(buffer=2), data=data).rounds())
    large = list(make_simulation(_config(buffer=4), data=data).rounds())
    assert small[-1].sim_time_s < large[-1].sim_time_s


def test_uploads_staler_than_max_staleness_are_rejected_as_late(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES)
    strict = list(make_simulation(_config(max_staleness=0), data=data).rounds())
    lenient = list(make_simulation(_config(max_staleness=1000), data=data).rounds())
    assert sum(m.late for m in strict) > 0
    assert sum(m.late for m in lenient) == 0
    # rejected uploads never enter a buffer: it still commits `buffer` accepted ones
    assert all(m.used == 3 for m in strict)


def test_concurrency_never_exceeds_max_concurrency(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES)
    for concurrency in (3, 7):
        sim = make_simulation(_config(max_concurrency=concurrency), data=data)
        assert isinstance(sim, AsyncSimulation)
        list(sim.rounds())
        assert sim.peak_concurrency == concurrency


def test_async_runs_are_deterministic_in_the_seed(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES)
    runs = []
    for _ in range(2):
        sim = make_simulation(_config(), data=data)
        history = [dataclasses.replace(m, wall_s=0.0) for m in sim.rounds()]
        runs.append((history, sim.params))
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        np.testing.assert_array_equal(runs[0][1][name], runs[1][1][name])
    other = make_simulation(dataclasses.replace(_config(), seed=1), data=data)
    assert [m.sim_time_s for m in other.rounds()] != [m.sim_time_s for m in runs[0][0]]


def test_device_compute_is_counted_in_both_modes(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES)
    for config in (_config(), dataclasses.replace(_config(), aggregation=Aggregation())):
        history = list(make_simulation(config, data=data).rounds())
        assert all(m.device_s > 0 for m in history)


def test_async_reaches_the_target_faster_than_sync_on_heterogeneous_devices(
        make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation(SIZES * 3)
    config = dataclasses.replace(
        _config(buffer=3, max_concurrency=9),
        data=DataConfig("synthetic:alpha=1,beta=1", num_devices=len(SIZES) * 3), rounds=200)
    result = compare_modes(config, 0.8, data=data)
    assert result["async"].sim_time_s is not None
    assert result["sync"].sim_time_s is not None
    assert result["time_speedup"] > 2.0


def test_async_refuses_what_it_does_not_simulate() -> None:
    base = dataclasses.replace(_config(max_concurrency=10),
                               selection=SelectionConfig(clients_per_round=10))
    with pytest.raises(SimulationConfigError, match="aggregation.mode.*secure_aggregation"):
        validate_simulation_config(dataclasses.replace(
            base, secure_aggregation=SecureAggregation()))
    with pytest.raises(SimulationConfigError, match="aggregation.mode.*scaffold"):
        validate_simulation_config(dataclasses.replace(
            base, algorithm=AlgorithmConfig(AlgorithmKind.SCAFFOLD)))
    with pytest.raises(SimulationConfigError, match="aggregation.mode.*median"):
        validate_simulation_config(dataclasses.replace(base, aggregation=dataclasses.replace(
            base.aggregation, robust=RobustAggregation(RobustKind.MEDIAN))))
    with pytest.raises(SimulationConfigError, match="round_deadline_s"):
        validate_simulation_config(dataclasses.replace(
            base, selection=SelectionConfig(clients_per_round=10, round_deadline_s=30)))
    with pytest.raises(SimulationConfigError, match="max_concurrency"):
        validate_simulation_config(_config(max_concurrency=len(SIZES) + 1))


_YAML = """
name: t
model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
rounds: 5
clients_per_round: 4
min_reports: 1
over_selection: 1.0
aggregation: {mode: async, buffer: 4, max_concurrency: 8, max_staleness: 3}
simulation:
  population: {devices: 20, data: "synthetic:alpha=1,beta=1"}
  compare: {target_accuracy: 0.5, with_mode: sync}
"""


def test_a_task_file_carries_aggregation_and_compare_into_the_simulation() -> None:
    config = parse_simulation_yaml(_YAML)
    assert config.aggregation.mode is AggregationMode.ASYNC
    assert (config.aggregation.buffer, config.aggregation.max_concurrency) == (4, 8)
    assert config.compare is not None and config.compare.target_accuracy == 0.5
    with pytest.raises(SimulationConfigError, match="compare.with_mode"):
        parse_simulation_yaml(_YAML.replace("with_mode: sync", "with_mode: async"))


# -- central DP: one noised release per version, no amplification claimed -------------------

def _central(**changes: object) -> PrivacySpec:
    return privacy_from_dict({"mode": "central", "noise_multiplier": 1.0, "delta": 1e-5,
                              "clip": 0.5, "population": len(SIZES), "sampling": "fixed",
                              "max_epsilon": 1e6, **changes}, "t")


def _private(privacy: PrivacySpec, **aggregation: object) -> SimulationConfig:
    return dataclasses.replace(_config(**aggregation), privacy=privacy)


def whole_population_epsilon(versions: int, z: float = 1.0) -> float:
    """Epsilon of ``versions`` releases that each count every device (q = 1, replace-one):
    the Gaussian mechanism of sensitivity 2C, i.e. multiplier z / 2 at sampling rate 1."""
    return epsilon(noise_multiplier=z / 2, sampling_rate=1.0, steps=versions, delta=1e-5)


def test_a_dp_release_is_the_clipped_staleness_weighted_sum_over_the_buffer() -> None:
    config = _private(_central(noise_multiplier=1e-6, max_epsilon=1e300), buffer=4)
    privacy = task_privacy(name="t", model=LINEAR, rounds=3, clients_per_round=3,
                           privacy=config.privacy, aggregation=config.aggregation)
    assert privacy is not None and privacy.expected_reports == 4
    big = np.full(4, 1.0)            # norm 2, clipped to C = 0.5
    small = np.array([0.1, 0.0, 0.0, 0.0])  # within C: kept as it is
    release = release_buffer(privacy, [big, big, small], [1.0, 0.5, 1.0],
                             source=NoiseSource.seeded(0))
    expected = (big / 2 * 0.5 + 0.5 * big / 2 * 0.5 + small) / 4  # / buffer, not / 3
    np.testing.assert_allclose(release.mean, expected, atol=1e-5)
    assert release.draw == privacy.planned_draw
    assert (release.draw.sampling_rate, release.draw.cohort) == (1.0, len(SIZES))


class _PushEveryWeightUp:
    """A trainer whose every device moves each weight by +10 (an update far above C)."""

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        n = len(jobs)
        return CohortResult(
            params={k: v.unsqueeze(0).repeat(n, *([1] * v.dim())) + 10.0
                    for k, v in global_params.items()},
            steps=np.ones(n, np.int64), num_examples=np.arange(1, n + 1),
            loss=np.zeros(n))


def test_async_dp_moves_the_model_by_the_clipped_staleness_weighted_sum_over_the_buffer(
        make_federation) -> None:  # type: ignore[no-untyped-def]
    # Equal devices, equal speeds, two training at once and a buffer of two: version 1
    # takes the two devices handed version 0 (staleness 0, 0); each later version takes one
    # device handed the version before it while the buffer filled and one handed the
    # current version (staleness 1, 0).
    config = dataclasses.replace(
        _private(_central(noise_multiplier=1e-6, max_epsilon=1e300), buffer=2,
                 max_concurrency=2, staleness=Staleness(StalenessKind.POLYNOMIAL, exponent=1.0)),
        heterogeneity=HeterogeneityConfig(), rounds=4)
    sim = make_simulation(config, data=make_federation([10] * len(SIZES)),
                          trainer=_PushEveryWeightUp())
    before = np.concatenate([v.reshape(-1) for v in sim.params.values()])
    moves = []
    for _ in sim.rounds():
        after = np.concatenate([v.reshape(-1) for v in sim.params.values()])
        moves.append(l2_norm(after - before))
        before = after
    clip = 0.5
    assert moves[0] == pytest.approx(clip * (1 + 1) / 2, rel=1e-4)
    assert moves[1:] == pytest.approx([clip * (0.5 + 1) / 2] * 3, rel=1e-4)


def test_async_dp_accounts_each_version_as_a_release_over_the_whole_population(
        make_federation) -> None:  # type: ignore[no-untyped-def]
    sim = make_simulation(_private(_central()), data=make_federation(SIZES))
    history = list(sim.rounds())
    assert [m.epsilon for m in history] == pytest.approx(
        [whole_population_epsilon(v) for v in range(1, 9)], rel=1e-9)
    assert sim.privacy is not None and sim.privacy.history[-1][1].sampling_rate == 1.0
    assert sim.outcome.state is TaskState.COMPLETED


def test_async_dp_stops_before_a_version_that_would_pass_the_budget(
        make_federation) -> None:  # type: ignore[no-untyped-def]
    budget = (whole_population_epsilon(2) + whole_population_epsilon(3)) / 2
    config = dataclasses.replace(_private(_central(max_epsilon=budget)),
                                 evaluation=EvaluationConfig(every=10))
    sim = make_simulation(config, data=make_federation(SIZES))
    history = list(sim.rounds())
    assert [m.round for m in history] == [1, 2]
    assert sim.outcome.state is TaskState.BUDGET_EXHAUSTED
    assert "privacy budget exhausted after 2 rounds" in sim.outcome.reason
    assert sim.privacy is not None and sim.privacy.epsilon() <= budget
    # The last committed model is the final one: evaluated, though no evaluation was due.
    assert [m.test_accuracy is not None for m in history] == [False, True]


@pytest.mark.parametrize(("change", "why"), [
    ({"mode": PrivacyMode.DISTRIBUTED}, "privacy.mode.*'distributed' needs secure aggregation"),
    ({"sampling": Sampling.POISSON}, "privacy.sampling.*'poisson' does not apply to "
                                     "aggregation.mode async"),
])
def test_async_dp_refuses_what_its_analysis_does_not_cover(change: dict[str, object],
                                                           why: str) -> None:
    privacy = dataclasses.replace(_central(), **change)  # type: ignore[arg-type]
    with pytest.raises(SimulationConfigError, match=why):
        validate_simulation_config(_private(privacy))


def test_the_mode_comparison_runs_with_central_dp_too(make_federation) -> None:  # type: ignore[no-untyped-def]
    config = dataclasses.replace(_private(_central()), rounds=3)
    result = compare_modes(config, 1.0, data=make_federation(SIZES))
    assert result["async"].final_accuracy is not None
    assert result["sync"].final_accuracy is not None


def test_async_adaptive_clipping_follows_the_devices_unclipped_bits(
        make_federation) -> None:  # type: ignore[no-untyped-def]
    adaptive = _central(clip={"target_quantile": 0.5, "initial": 100.0, "learning_rate": 0.2,
                              "bit_noise": 1.0})
    sim = make_simulation(dataclasses.replace(_private(adaptive), rounds=1),
                          data=make_federation(SIZES))
    list(sim.rounds())
    assert sim.privacy is not None and sim.privacy.clip < 100.0
