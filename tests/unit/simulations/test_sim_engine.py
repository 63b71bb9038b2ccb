"""Whole simulations: algorithms, the simulated clock, dropouts, outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from core.types import LocalTraining, ModelSpec, ServerOptimizer, ServerOptimizerKind
from simulations.config import (
    AlgorithmConfig,
    AlgorithmKind,
    DataConfig,
    Distribution,
    DistributionKind,
    EngineConfig,
    EngineKind,
    HeterogeneityConfig,
    SelectionConfig,
    SimulationConfig,
)
from simulations.devices import DeviceProfiles, plan_round
from simulations.engine import Simulation
from simulations.outputs import MetricsWriter, plot_runs

LINEAR = ModelSpec("logistic_regression", {"input_dim": 6, "num_classes": 3})


def _config(**changes: object) -> SimulationConfig:
    base = SimulationConfig(
        name="tiny", model=LINEAR, data=DataConfig("synthetic:alpha=1,beta=1", num_devices=8),
        rounds=3, selection=SelectionConfig(clients_per_round=4),
        local=LocalTraining(epochs=2, batch_size=5, learning_rate=0.1))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _params_after(config: SimulationConfig, data, rounds: int = 3) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    sim = Simulation(config, data=data)
    list(sim.rounds(rounds))
    return sim.params


def test_fedprox_with_mu_zero_is_fedavg(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation([5, 12, 30, 8, 19, 3, 25, 10])
    fedavg = _params_after(_config(), data)
    fedprox = _params_after(_config(algorithm=AlgorithmConfig(AlgorithmKind.FEDPROX, mu=0.0)),
                            data)
    for name in fedavg:
        np.testing.assert_array_equal(fedprox[name], fedavg[name])
    moved = _params_after(_config(algorithm=AlgorithmConfig(AlgorithmKind.FEDPROX, mu=1.0)),
                          data)
    assert not np.allclose(moved["linear.weight"], fedavg["linear.weight"])


def test_engines_give_the_same_simulation(make_federation) -> None:  # type: ignore[no-untyped-def]
    data = make_federation([5, 12, 30, 8, 19, 3, 25, 10])
    results = [_params_after(_config(engine=EngineConfig(kind)), data)
               for kind in (EngineKind.LOOP, EngineKind.BMM, EngineKind.VMAP)]
    for other in results[1:]:
        for name in results[0]:
            np.testing.assert_allclose(other[name], results[0][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("server", [ServerOptimizerKind.FEDAVG, ServerOptimizerKind.FEDADAM])
def test_scaffold_runs_and_converges_on_a_tiny_problem(make_federation, server) -> None:  # type: ignore[no-untyped-def]
    data = make_federation([20] * 8)
    config = _config(rounds=15, algorithm=AlgorithmConfig(AlgorithmKind.SCAFFOLD),
                     server=ServerOptimizer(kind=server, learning_rate=1.0 if server is
                                            ServerOptimizerKind.FEDAVG else 0.05))
    history = list(Simulation(config, data=data).rounds())
    assert history[-1].test_accuracy is not None and history[-1].test_accuracy > 0.75
    assert history[-1].train_loss is not None and history[0].train_loss is not None
    assert history[-1].train_loss < 0.6 * history[0].train_loss


def _profiles(n: int, *, speed: float = 10.0, latency: float = 0.0, dropout: float = 0.0,
              availability: float = 1.0) -> DeviceProfiles:
    return DeviceProfiles(speed=np.full(n, speed), availability=np.full(n, availability),
                          latency_s=np.full(n, latency), dropout=np.full(n, dropout))


LOCAL = LocalTraining(epochs=4, batch_size=10, learning_rate=0.1)


def test_a_deadline_drops_devices_that_cannot_finish() -> None:
    # 10 examples/s, a step of 10 examples is 1 s: 40 examples x 4 epochs = 16 s of work.
    sizes = np.array([40, 40, 10, 10])
    selection = SelectionConfig(clients_per_round=4, round_deadline_s=10.0)
    plan = plan_round(1, profiles=_profiles(4), sizes=sizes, selection=selection, local=LOCAL,
                      straggler_fraction=0.0, seed=0)
    assert sorted(w.device for w in plan.used) == [2, 3]
    assert plan.stragglers == 2 and plan.partial == 0
    assert all(w.arrival_s == 4.0 for w in plan.used)
    assert plan.duration_s == 10.0  # fewer than the goal: the round runs to its deadline


def test_keep_partial_work_reports_the_steps_done_by_the_deadline() -> None:
    sizes = np.array([40, 10])
    selection = SelectionConfig(clients_per_round=2, round_deadline_s=10.0,
                                keep_partial_work=True)
    plan = plan_round(1, profiles=_profiles(2, latency=1.0), sizes=sizes, selection=selection,
                      local=LOCAL, straggler_fraction=0.0, seed=0)
    work = {w.device: w for w in plan.used}
    assert work[0].steps == 9 and not work[0].complete and work[0].arrival_s == 10.0
    assert work[1].steps == 4 and work[1].complete and work[1].arrival_s == 5.0
    assert plan.partial == 1 and plan.stragglers == 0


def test_stragglers_do_fewer_epochs_and_are_dropped_unless_partial_work_is_kept() -> None:
    sizes = np.full(10, 20)
    for keep in (False, True):
        selection = SelectionConfig(clients_per_round=10, keep_partial_work=keep)
        plan = plan_round(3, profiles=_profiles(10), sizes=sizes, selection=selection,
                          local=LOCAL, straggler_fraction=0.9, seed=1)
        assert len(plan.admitted) == 10
        if keep:
            partial = [w for w in plan.used if not w.complete]
            assert len(partial) == 9 and len(plan.used) == 10
            assert all(w.steps in (2, 4, 6) for w in partial)  # 1..3 of 4 epochs, 2 steps each
        else:
            assert len(plan.used) == 1 and plan.stragglers == 9


def test_over_selection_aggregates_the_first_reports_and_counts_the_rest_late() -> None:
    sizes = np.array([10, 20, 30, 40, 50])
    selection = SelectionConfig(clients_per_round=3, over_selection=5 / 3)
    plan = plan_round(1, profiles=_profiles(5), sizes=sizes, selection=selection, local=LOCAL,
                      straggler_fraction=0.0, seed=0)
    assert len(plan.admitted) == 5
    assert [w.device for w in plan.used] == [0, 1, 2] and plan.late == 2
    assert plan.duration_s == 12.0


def test_dropouts_never_report_and_too_few_reports_fail_the_round() -> None:
    sizes = np.full(6, 10)
    selection = SelectionConfig(clients_per_round=6, min_reports=2)
    gone = plan_round(1, profiles=_profiles(6, dropout=1.0), sizes=sizes, selection=selection,
                      local=LOCAL, straggler_fraction=0.0, seed=0)
    assert gone.dropped_out == 6 and not gone.used and not gone.committed
    offline = plan_round(1, profiles=_profiles(6, availability=0.0), sizes=sizes,
                         selection=selection, local=LOCAL, straggler_fraction=0.0, seed=0)
    assert offline.available == 0 and not offline.committed


def test_a_failed_round_leaves_the_model_unchanged(make_federation) -> None:  # type: ignore[no-untyped-def]
    config = _config(heterogeneity=HeterogeneityConfig(dropout=1.0))
    sim = Simulation(config, data=make_federation([10] * 8))
    before = {n: v.copy() for n, v in sim.params.items()}
    metrics = sim.run_round(1)
    assert not metrics.committed and metrics.dropped_out == 4 and metrics.used == 0
    assert metrics.attempts == config.selection.max_failed_attempts
    for name in before:
        np.testing.assert_array_equal(sim.params[name], before[name])
    assert len(list(Simulation(config, data=make_federation([10] * 8)).rounds(3))) == 1, \
        "a round whose every attempt failed ends the run, as it fails the coordinator's task"


def test_a_failed_attempt_is_redone_with_a_fresh_selection(make_federation) -> None:  # type: ignore[no-untyped-def]
    config = _config(selection=SelectionConfig(clients_per_round=4, min_reports=4),
                     heterogeneity=HeterogeneityConfig(dropout=0.3))
    sim = Simulation(config, data=make_federation([10] * 8))
    history = [sim.run_round(r, evaluate_now=False) for r in range(1, 9)]
    assert all(m.committed and m.used == 4 for m in history)
    retried = [m for m in history if m.attempts > 1]
    assert retried, "with 30% dropout some first attempts have fewer than 4 reports"
    for m in retried:
        plans = [plan_round(m.round, profiles=sim.profiles, sizes=sim.table.sizes,
                            selection=config.selection, local=config.local,
                            straggler_fraction=0.0, seed=config.seed, attempt=a)
                 for a in range(1, m.attempts + 1)]
        assert [p.committed for p in plans] == [False] * (m.attempts - 1) + [True]
        assert m.round_time_s == pytest.approx(sum(p.duration_s for p in plans))


def test_dropout_rate_is_roughly_the_configured_probability(make_federation) -> None:  # type: ignore[no-untyped-def]
    config = _config(selection=SelectionConfig(clients_per_round=8),
                     heterogeneity=HeterogeneityConfig(
                         dropout=0.25, speed=Distribution(DistributionKind.LOGNORMAL, mu=3)))
    sim = Simulation(config, data=make_federation([10] * 8))
    dropped = sum(sim.run_round(r, evaluate_now=False).dropped_out for r in range(1, 41))
    assert 0.15 < dropped / (40 * 8) < 0.35


def test_metrics_are_written_as_jsonl_csv_and_png(make_federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sim = Simulation(_config(), data=make_federation([10] * 8))
    with MetricsWriter(tmp_path) as writer:
        history = []
        for metrics in sim.rounds(2):
            writer.write(metrics)
            history.append(metrics)
    plot_runs({"tiny": history}, tmp_path / "metrics.png")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["test_accuracy"] is not None
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,committed,") and len(csv_lines) == 3
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
