"""One device cannot own the model: its weight is capped, an update over the task's L2 norm
bound is refused naming the bound, and a model with a non-finite or absurd parameter is never
committed (the round fails with the reason). Round metrics are always finite."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest, Late
from coordinator.rounds.round_machine import _finite
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome, Participation, UpdateHeader
from core.tensors import load_safetensors, sha256_hex, to_raw_bytes
from core.types import (
    DeviceAttributes,
    ModelSpec,
    Robustness,
    RoundState,
    ServerOptimizer,
    TaskSpec,
)

ATTRS = DeviceAttributes()


def spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="bounds", model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=2, clients_per_round=3, min_reports=2, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0)
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(3), settings=CoordinatorSettings())


def admit(service: CoordinatorService, clock: ManualClock, task_id: str, devices: list[str]
          ) -> dict[str, Participation]:
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    seats = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        assert r.outcome is CheckInOutcome.ACCEPTED
        seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def upload(service: CoordinatorService, p: Participation, value: float, num_examples: int = 10,
           metrics: dict[str, float] | None = None) -> str:
    plan = service.get_plan(p)
    payload = to_raw_bytes({t.name: np.full(t.shape, value, np.float32)
                            for t in plan.update_tensors})
    up = service.begin_upload(UpdateHeader(p, num_examples, list(plan.update_tensors),
                                           len(payload), sha256_hex(payload), metrics or {}))
    up.write(payload)
    return service.finish_upload(up)


def params(service: CoordinatorService, task_id: str) -> dict[str, np.ndarray]:
    rec = service.model_version(task_id, None)
    return load_safetensors(b"".join(service.model_chunks(rec, 1 << 20)))


def test_a_device_claiming_2_31_examples_weighs_as_weight_cap(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec(robustness=Robustness(weight_cap=100))).record.task_id
    before = params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    upload(service, seats["a"], 1.0, num_examples=100, metrics={"train_loss": 1.0})
    upload(service, seats["b"], 1.0, num_examples=100, metrics={"train_loss": 1.0})
    upload(service, seats["c"], 4.0, num_examples=2**31, metrics={"train_loss": 1e9})
    after = params(service, task_id)
    for k in before:  # the attacker's share is 1/3, not 0.9999999
        np.testing.assert_allclose(after[k], before[k] + 2.0, rtol=1e-6)
    committed = service.list_rounds(task_id)[0]
    assert committed.metrics["examples"] == 300
    assert math.isclose(committed.metrics["train_loss"], (2 * 1.0 + 1e9) / 3)


def test_an_update_over_the_norm_bound_is_refused_naming_the_bound(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec(
        robustness=Robustness(max_update_l2_norm=10.0))).record.task_id
    before = params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    with pytest.raises(InvalidRequest, match=r"L2 norm 1\.1\d*e\+39.*bound of 10 "
                                             r"\(robustness.max_update_l2_norm\)"):
        upload(service, seats["c"], 3e38)
    with pytest.raises(Late, match="out of round 1"):  # refused content: out of the round
        upload(service, seats["c"], 0.0)
    upload(service, seats["a"], 1.0)
    upload(service, seats["b"], 1.0)
    after = params(service, task_id)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + 1.0, rtol=1e-6)


def test_a_model_above_max_abs_parameter_is_never_committed(
    service: CoordinatorService, clock: ManualClock
) -> None:
    # Each update is within the norm bound, but the server optimizer's step makes the model
    # absurd: the round fails with the reason, and the model stays at version 0.
    task_id = service.create_task(spec(
        robustness=Robustness(max_abs_parameter=50.0),
        server=ServerOptimizer(learning_rate=1000.0))).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    for d in "abc":
        upload(service, seats[d], 1.0)
    rounds = service.list_rounds(task_id)
    assert rounds[0].state is RoundState.FAILED
    assert "not committed" in rounds[0].failure_reason
    assert "max_abs_parameter (50)" in rounds[0].failure_reason
    assert service.model_version(task_id, None).version == 0


def test_round_metrics_that_are_not_finite_are_never_stored() -> None:
    assert _finite("t", {"a": 1.0, "b": math.inf, "c": math.nan}) == {"a": 1.0}
