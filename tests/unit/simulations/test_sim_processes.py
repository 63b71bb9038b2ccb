"""engine.processes: a cohort split across local worker processes gives exactly the
in-process result, for the lock-step engine and for the one-device-at-a-time loop, with
weights back through shared memory or, past its capacity, pickled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.models import initial_state
from core.types import LocalTraining, ModelSpec
from simulations.algorithms import local_objective
from simulations.cohort import DeviceJob, DeviceTable, full_steps, make_trainer
from simulations.cohort_split import split_jobs
from simulations.config import AlgorithmConfig, AlgorithmKind, EngineKind
from simulations.process_backend import ProcessCohortTrainer

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
