"""Memory of large simulations: the training data is held once (loaded packed, the device
table is that memory, moved to shared memory in place), worker processes train their share
in bounded slices with exactly the in-process result, are all started before the first
round, and FedAvg's mean streams the cohort's deltas."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from core.aggregation.fedavg import weighted_mean
from core.models import initial_state
from core.types import LocalTraining, ModelSpec
from simulations.algorithms import local_objective, mean_deltas
from simulations.cohort import CohortResult, DeviceJob, DeviceTable, make_trainer
from simulations.config import AlgorithmConfig, DataConfig, EngineKind
from simulations.data import PackedRows, load_federated_data
from simulations.process_backend import ProcessCohortTrainer

MLP = ModelSpec("mlp", {"input_dim": 60, "hidden": [16], "num_classes": 10})
LOCAL = LocalTraining(epochs=1, batch_size=10, learning_rate=0.05)


def synthetic(devices: int) -> DataConfig:
    return DataConfig("synthetic:alpha=1,beta=1,seed=3", num_devices=devices)


def test_loaded_data_is_one_table_that_the_device_table_uses_without_a_copy() -> None:
    data = load_federated_data(synthetic(12))
    assert isinstance(data.x_train, PackedRows) and isinstance(data.y_train, PackedRows)
    table = DeviceTable(data)
    assert np.shares_memory(table.x.numpy(), data.x_train[5])
    assert np.shares_memory(table.y.numpy(), data.y_train[5])
    lo, hi = table.offsets[5], table.offsets[6]
    np.testing.assert_array_equal(table.x[lo:hi].numpy(), data.x_train[5])
    assert not table.x[table.pad_row].any() and int(table.y[table.pad_row]) == 0


def test_moving_the_table_to_shared_memory_moves_the_data_with_it() -> None:
    data = load_federated_data(synthetic(6))
    before = [x.copy() for x in data.x_train]
    table = DeviceTable(data)
    table.share_memory()
    assert table.x.is_shared()  # type: ignore[no-untyped-call]
    for k, x in enumerate(data.x_train):
        assert np.shares_memory(x, table.x.numpy()), f"device {k} still reads the old table"
        np.testing.assert_array_equal(x, before[k])


def test_packed_rows_are_a_sequence_of_views_and_refuse_another_table() -> None:
    rows = PackedRows(np.arange(12.0).reshape(6, 2), np.array([0, 2, 5]))
    assert len(rows) == 2 and rows[-1].shape == (3, 2) and len(rows[0:2]) == 2
    with pytest.raises(IndexError, match="device 2 of 2"):
        rows[2]
    with pytest.raises(ValueError, match="cannot replace"):
        rows.rebase(np.zeros((5, 2)))


@pytest.mark.slow  # spawns worker processes
def test_workers_are_started_before_the_first_round_and_slices_change_nothing() -> None:
    data = load_federated_data(synthetic(10))
    table = DeviceTable(data)
    params = {n: torch.from_numpy(v) for n, v in initial_state(MLP, 0).items()}
    cohort = [DeviceJob(d, 40 + d, None if d % 4 else 3) for d in range(10)]
    algorithm = AlgorithmConfig()
    expected = make_trainer(EngineKind.BMM, MLP, table, LOCAL,
                            local_objective(algorithm)).train(params, cohort)
    # slice_bytes=1: every worker trains one device at a time into the shared rows.
    with ProcessCohortTrainer(table, 2, kind=EngineKind.BMM, model=MLP, local=LOCAL,
                              algorithm=algorithm, capacity=10, slice_bytes=1) as pool:
        pids = pool.worker_pids
        assert len(pids) == 2 and os.getpid() not in pids
        for pid in pids:
            os.kill(pid, 0)  # alive (raises if not)
        got = pool.train(params, cohort)
        assert pool.worker_pids == pids, "no worker was started by the round"
    # Within float rounding, not bit for bit: cutting a lock-step group changes the batch
    # count of its batched products, whose kernels may round differently (a large model's
    # groups are one device each and its slices cut none; a small model's share is one slice).
    for name in params:
        torch.testing.assert_close(got.params[name], expected.params[name])
    np.testing.assert_array_equal(got.steps, expected.steps)
    np.testing.assert_allclose(got.loss, expected.loss, rtol=1e-6)


def test_the_streamed_mean_is_the_coordinators_weighted_mean_of_the_deltas() -> None:
    rng = np.random.default_rng(1)
    start = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    trained = torch.from_numpy(rng.normal(size=(5, 3, 4)).astype(np.float32))
    examples = np.array([3, 9, 1, 4, 7])
    result = CohortResult(params={"w": trained}, steps=np.ones(5, np.int64),
                          num_examples=examples, loss=np.zeros(5))
    expected = weighted_mean(list(trained.numpy() - start["w"]), [float(n) for n in examples])
    np.testing.assert_array_equal(mean_deltas(start, result)["w"], expected)


def test_data_loaded_into_shared_memory_is_shared_without_a_copy() -> None:
    data = load_federated_data(synthetic(6), shared_memory=True)
    table = DeviceTable(data)
    assert table.x.is_shared() and table.y.is_shared()  # type: ignore[no-untyped-call]
    pointer = table.x.data_ptr()
    table.share_memory()
    assert table.x.data_ptr() == pointer, "already shared: nothing to move"
    assert np.shares_memory(table.x.numpy(), data.x_train[3])
    assert not table.x[table.pad_row].any() and int(table.y[table.pad_row]) == 0
