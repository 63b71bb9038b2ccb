"""engine.processes: a cohort split across local worker processes gives exactly the
in-process result, for the lock-step engine and for the one-device-at-a-time loop, with
weights back through shared memory or, past its capacity, pickled."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.models import initial_state
from core.privacy.spec import PrivacyMode, PrivacySpec
from core.types import (
    Aggregation,
    AggregationMode,
    LocalTraining,
    ModelSpec,
    RobustAggregation,
    RobustKind,
    SecureAggregation,
    ServerOptimizer,
)
from simulations.algorithms import local_objective, make_algorithm, mean_deltas
from simulations.cohort import CohortResult, DeviceJob, DeviceTable, full_steps, make_trainer
from simulations.cohort_split import split_jobs
from simulations.config import (
    AlgorithmConfig,
    AlgorithmKind,
    DataConfig,
    EngineKind,
    SelectionConfig,
    SimulationConfig,
)
from simulations.process_backend import ProcessCohortTrainer, sums_suffice

MLP = ModelSpec("mlp", {"input_dim": 6, "hidden": [8], "num_classes": 3})
LOCAL = LocalTraining(epochs=2, batch_size=4, learning_rate=0.1, momentum=0.5)
SIZES = [5, 40, 30, 8, 19, 3, 25, 10, 90, 12]


def jobs(count: int) -> list[DeviceJob]:
    return [DeviceJob(d % len(SIZES), 100 + d, None if d % 3 else 4) for d in range(count)]


@pytest.mark.slow  # spawns worker processes
@pytest.mark.parametrize("kind", [EngineKind.BMM, EngineKind.LOOP])
def test_worker_processes_train_exactly_what_one_process_trains(make_federation,  # type: ignore[no-untyped-def]
                                                                kind: EngineKind) -> None:
    table = DeviceTable(make_federation(SIZES))
    algorithm = AlgorithmConfig(kind=AlgorithmKind.SCAFFOLD)
    params = {n: torch.from_numpy(v) for n, v in initial_state(MLP, 0).items()}
    rng = np.random.default_rng(0)
    here = make_trainer(kind, MLP, table, LOCAL, local_objective(algorithm))
    with ProcessCohortTrainer(table, 2, kind=kind, model=MLP, local=LOCAL,
                              algorithm=algorithm, capacity=6) as pool:
        for count in (6, 9):  # within the shared capacity, then past it (pickled)
            cohort = jobs(count)
            corrections = {n: torch.from_numpy(rng.normal(scale=0.01, size=(count, *p.shape))
                                               .astype(np.float32))
                           for n, p in params.items()}
            expected = here.train(params, cohort, corrections)
            got = pool.train(params, cohort, corrections)
            for name in params:
                torch.testing.assert_close(got.params[name], expected.params[name],
                                           rtol=0, atol=0)
            np.testing.assert_array_equal(got.steps, expected.steps)
            np.testing.assert_array_equal(got.num_examples, expected.num_examples)
            np.testing.assert_array_equal(got.loss, expected.loss)


def test_fewer_than_two_processes_is_refused(make_federation) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="at least 2"):
        ProcessCohortTrainer(DeviceTable(make_federation([3, 4])), 1, kind=EngineKind.BMM,
                             model=MLP, local=LOCAL, algorithm=AlgorithmConfig())


def test_a_lock_step_split_gives_the_giant_device_a_worker_of_its_own() -> None:
    """One device with 10x anyone's steps: its worker pays the per-step price alone, so
    the others all go to the other worker (a pure step-count balance would not do it)."""
    costs = [1800, 288, 281, 271, 240, 200, 150, 120, 100, 90, 60, 40]
    cohort = [DeviceJob(i, i) for i in range(len(costs))]
    giant, rest = split_jobs(cohort, costs, 2, lock_step_overhead=0.9)
    assert giant == [0] and sorted(rest) == list(range(1, len(costs)))
    balanced = split_jobs(cohort, costs, 2)
    assert len(balanced[0]) > 1, "without the overhead term the giant gets company"
    assert full_steps(45, LOCAL) == 2 * 12


@pytest.mark.slow  # spawns worker processes
def test_a_dead_worker_is_a_simulation_error_naming_the_likely_cause(make_federation) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal

    from simulations.errors import SimulationError

    table = DeviceTable(make_federation(SIZES))
    params = {n: torch.from_numpy(v) for n, v in initial_state(MLP, 0).items()}
    with ProcessCohortTrainer(table, 2, kind=EngineKind.BMM, model=MLP, local=LOCAL,
                              algorithm=AlgorithmConfig(), capacity=6) as pool:
        pool.train(params, jobs(4))  # the workers are up
        worker = next(iter(pool._pool._processes.values()))  # noqa: SLF001 - the test's victim
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        with pytest.raises(SimulationError, match="worker process died"):
            pool.train(params, jobs(4))


@pytest.mark.slow  # spawns worker processes
def test_workers_that_sum_the_deltas_give_the_mean_of_the_devices_models(make_federation) -> None:  # type: ignore[no-untyped-def]
    """Plain FedAvg needs only sum_i n_i (w_i - w): each worker returns its devices' sum,
    no device's weights, and the mean is the one the devices' own models give (the same
    float64 terms, added in another order)."""
    table = DeviceTable(make_federation(SIZES))
    algorithm = AlgorithmConfig(kind=AlgorithmKind.FEDPROX, mu=0.1)
    params = {n: torch.from_numpy(v) for n, v in initial_state(MLP, 0).items()}
    start = {n: p.numpy() for n, p in params.items()}
    here = make_trainer(EngineKind.BMM, MLP, table, LOCAL, local_objective(algorithm))
    with ProcessCohortTrainer(table, 2, kind=EngineKind.BMM, model=MLP, local=LOCAL,
                              algorithm=algorithm, capacity=6, sum_deltas=True,
                              slice_bytes=1) as pool:  # one device at a time: many slices
        for count in (1, 9):
            cohort = jobs(count)
            expected = here.train(params, cohort)
            got = pool.train(params, cohort)
            assert got.params == {} and got.delta_sum is not None
            want = mean_deltas(start, expected)
            for name, mean in mean_deltas(start, got).items():
                np.testing.assert_allclose(mean, want[name], rtol=1e-6, atol=1e-9)
            np.testing.assert_array_equal(got.steps, expected.steps)
            np.testing.assert_array_equal(got.num_examples, expected.num_examples)
            np.testing.assert_array_equal(got.loss, expected.loss)


def test_only_rounds_that_need_just_the_mean_are_summed_in_the_workers() -> None:
    plain = SimulationConfig(name="t", model=MLP, rounds=1,
                             data=DataConfig("synthetic:alpha=1,beta=1", num_devices=4),
                             selection=SelectionConfig(clients_per_round=2))
    assert sums_suffice(plain)
    assert sums_suffice(dataclasses.replace(
        plain, algorithm=AlgorithmConfig(kind=AlgorithmKind.FEDPROX, mu=0.1)))
    need_each_device = [
        dataclasses.replace(plain, algorithm=AlgorithmConfig(kind=AlgorithmKind.SCAFFOLD)),
        dataclasses.replace(plain, secure_aggregation=SecureAggregation()),
        dataclasses.replace(plain, privacy=PrivacySpec(mode=PrivacyMode.CENTRAL)),
        dataclasses.replace(plain, aggregation=Aggregation(
            robust=RobustAggregation(kind=RobustKind.MEDIAN))),
        dataclasses.replace(plain, aggregation=Aggregation(mode=AggregationMode.ASYNC)),
    ]
    assert not any(sums_suffice(c) for c in need_each_device)


def test_a_summed_result_is_refused_where_each_devices_model_is_needed() -> None:
    start = {"w": np.zeros(3, np.float32)}
    summed = CohortResult(params={}, steps=np.ones(2, np.int64),
                          num_examples=np.array([1, 3]), loss=np.zeros(2),
                          delta_sum={"w": np.array([4.0, 0.0, -8.0])})
    np.testing.assert_array_equal(mean_deltas(start, summed)["w"], [1.0, 0.0, -2.0])
    scaffold = make_algorithm(AlgorithmConfig(kind=AlgorithmKind.SCAFFOLD), ServerOptimizer(),
                              num_devices=4, learning_rate=0.1)
    with pytest.raises(ValueError, match="SCAFFOLD's control variates need each device"):
        scaffold.server_update(start, [0, 1], summed)


@pytest.mark.slow  # forks worker processes
def test_workers_forked_after_this_process_ran_threaded_torch_ops_train(make_federation) -> None:  # type: ignore[no-untyped-def]
    """The workers are forked from this process (they share its pages): a parent whose
    torch used several threads (OpenMP's pool is not fork-safe) still gets workers that
    start and train, each with its own one thread."""
    table = DeviceTable(make_federation(SIZES))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region in this process
        params = {n: torch.from_numpy(v) for n, v in initial_state(MLP, 0).items()}
        here = make_trainer(EngineKind.BMM, MLP, table, LOCAL, local_objective(AlgorithmConfig()))
        with ProcessCohortTrainer(table, 2, kind=EngineKind.BMM, model=MLP, local=LOCAL,
                                  algorithm=AlgorithmConfig(), capacity=6,
                                  start_timeout_s=60) as pool:
            got = pool.train(params, jobs(6))
        expected = here.train(params, jobs(6))
    finally:
        torch.set_num_threads(before)
    for name in params:
        torch.testing.assert_close(got.params[name], expected.params[name], rtol=0, atol=0)


def test_a_model_trained_one_device_at_a_time_is_split_by_its_steps_alone(make_federation) -> None:  # type: ignore[no-untyped-def]
    """The lock-step term charges a worker its longest device once more; where the bmm
    trainer's groups hold one device (weights past 4 MiB) there is no lock step, and the
    term only left the giant's worker idle."""
    from simulations.cohort import lock_step_devices
    from simulations.cohort_split import LOCK_STEP_OVERHEAD
    from simulations.process_backend import _lock_step_overhead

    table = DeviceTable(make_federation(SIZES, features=60, classes=10))
    big = ModelSpec("mlp", {"input_dim": 60, "hidden": [1000, 1000], "num_classes": 10})
    small = ModelSpec("mlp", {"input_dim": 60, "hidden": [200, 200], "num_classes": 10})
    assert lock_step_devices(4_288_040) == 1 and lock_step_devices(217_640) == 19
    assert _lock_step_overhead(EngineKind.AUTO, big, table, LOCAL) == 0.0
    assert _lock_step_overhead(EngineKind.AUTO, small, table, LOCAL) == LOCK_STEP_OVERHEAD
    assert _lock_step_overhead(EngineKind.VMAP, big, table, LOCAL) == LOCK_STEP_OVERHEAD
    assert _lock_step_overhead(EngineKind.LOOP, small, table, LOCAL) == 0.0
