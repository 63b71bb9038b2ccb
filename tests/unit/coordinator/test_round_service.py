"""The round state machine, driven by a manual clock: no network, no sleeps."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import Duplicate, InvalidRequest, Late, NotSelected, TooLarge
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome, Participation, UpdateHeader
from core.tensors import load_safetensors, sha256_hex, to_raw_bytes
from core.types import (
    DeviceAttributes,
    Eligibility,
    ModelSpec,
    RoundState,
    TaskSpec,
    TaskState,
)

ATTRS = DeviceAttributes()


def spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="unit",
        model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=2,
        clients_per_round=3,
        min_reports=2,
        over_selection=1.0,
        round_deadline_s=30.0,
        selection_window_s=1.0,
    )
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


def make_service(store: InMemoryStore, clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(store, FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(7), settings=CoordinatorSettings(max_chunk_bytes=64))


@pytest.fixture
def service(store: InMemoryStore, clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return make_service(store, clock, tmp_path)


def admit(service: CoordinatorService, clock: ManualClock, task_id: str, devices: list[str]
          ) -> dict[str, Participation]:
    for d in devices:
        assert service.check_in(d, ATTRS, task_id).outcome is CheckInOutcome.RETRY_LATER
    clock.advance(1.1)
    seats = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        if r.outcome is CheckInOutcome.ACCEPTED:
            seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def upload(service: CoordinatorService, p: Participation, delta: dict[str, np.ndarray],
           num_examples: int = 10, *, chunk: int = 64, corrupt: bytes | None = None,
           declared: int | None = None) -> None:
    plan = service.get_plan(p)
    payload = to_raw_bytes(delta)
    header = UpdateHeader(
        participation=p, num_examples=num_examples, tensors=list(plan.update_tensors),
        total_bytes=declared if declared is not None else len(payload),
        sha256=sha256_hex(payload), metrics={"train_loss": 1.0},
    )
    up = service.begin_upload(header)
    body = corrupt if corrupt is not None else payload
    try:
        for i in range(0, len(body), chunk):
            up.write(body[i:i + chunk])
    except Exception:
        service.abort_upload(up)
        raise
    service.finish_upload(up)


def model_params(service: CoordinatorService, task_id: str, version: int | None = None
                 ) -> dict[str, np.ndarray]:
    rec = service.model_version(task_id, version)
    return load_safetensors(b"".join(service.model_chunks(rec, 1 << 20)))


def deltas_like(params: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in params.items()}


def test_devices_in_the_selection_window_are_told_to_come_back_then_admitted(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(clients_per_round=2, min_reports=1, over_selection=1.5))
    seats = admit(service, clock, task.record.task_id, [f"d{i}" for i in range(6)])
    assert len(seats) == 3  # goal 2 x over-selection 1.5
    rounds = service.list_rounds(task.record.task_id)
    assert rounds[-1].state is RoundState.TRAINING and rounds[-1].selected == 3
    others = [d for d in (f"d{i}" for i in range(6)) if d not in seats]
    r = service.check_in(others[0], ATTRS, task.record.task_id)
    assert r.outcome is CheckInOutcome.RETRY_LATER and r.retry_after_s > 0


def test_selection_is_uniform_over_the_candidates(tmp_path: Path) -> None:
    counts = {f"d{i}": 0 for i in range(10)}
    for trial in range(60):
        clock = ManualClock()
        service = CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / str(trial)),
                                     clock, rng=random.Random(trial))
        task = service.create_task(spec(clients_per_round=2, min_reports=1))
        for d in admit(service, clock, task.record.task_id, list(counts)):
            counts[d] += 1
    # 120 seats over 10 devices: each expected 12; a biased (first-come) rule gives 60/60/0...
    assert max(counts.values()) < 25 and min(counts.values()) > 3


def test_ineligible_devices_are_not_admitted(service: CoordinatorService) -> None:
    task = service.create_task(spec(eligibility=Eligibility(require_charging=True)))
    r = service.check_in("d0", DeviceAttributes(charging=False), task.record.task_id)
    assert r.outcome is CheckInOutcome.NO_TASK and "not eligible" in r.message


def test_fedavg_commits_the_weighted_mean_of_the_updates(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec()).record.task_id
    before = model_params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    upload(service, seats["a"], deltas_like(before, 1.0), num_examples=10)
    upload(service, seats["b"], deltas_like(before, 2.0), num_examples=30)
    upload(service, seats["c"], deltas_like(before, 4.0), num_examples=60)
    after = model_params(service, task_id)
    expected_shift = (10 * 1 + 30 * 2 + 60 * 4) / 100
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + expected_shift, rtol=1e-6)
    rounds = service.list_rounds(task_id)
    assert rounds[0].state is RoundState.COMMITTED and rounds[0].model_version == 1
    assert rounds[1].state is RoundState.SELECTING and rounds[1].round_number == 2


def test_a_device_that_reported_is_told_to_come_back_while_the_round_waits_for_others(
        service: CoordinatorService, clock: ManualClock) -> None:
    task_id = service.create_task(spec(rounds=2)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    assert set(seats) == {"a", "b", "c"}
    upload(service, seats["a"], deltas_like(model_params(service, task_id), 0.1))

    again = service.check_in("a", ATTRS, task_id)
    assert again.outcome is CheckInOutcome.RETRY_LATER
    assert "update for round 1 is in" in again.message and again.retry_after_s > 0
    # A device seated and not yet reported still gets its seat back (a retry after a
    # dropped connection, say).
    assert service.check_in("b", ATTRS, task_id).outcome is CheckInOutcome.ACCEPTED


def test_bad_updates_are_rejected_and_never_touch_the_aggregate(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec(clients_per_round=3, min_reports=2,
                                       over_selection=1.0)).record.task_id
    before = model_params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    good = deltas_like(before, 1.0)
    upload(service, seats["a"], good)

    with pytest.raises(Duplicate):
        upload(service, seats["a"], good)
    with pytest.raises(NotSelected):
        upload(service, Participation("zz", task_id, 1, "x"), good)
    with pytest.raises(NotSelected):
        upload(service, Participation("b", task_id, 1, "wrong-token"), good)
    transposed = {k: np.zeros(v.shape[::-1], np.float32) for k, v in before.items()}
    up_header = service.get_plan(seats["b"]).update_tensors
    with pytest.raises(InvalidRequest, match="does not match the model"):
        service.begin_upload(UpdateHeader(
            seats["b"], 10, [type(t)(t.name, t.dtype, t.shape[::-1]) for t in up_header],
            len(to_raw_bytes(transposed)), "", {}))
    with pytest.raises(InvalidRequest, match="declares"):
        upload(service, seats["b"], good, declared=len(to_raw_bytes(good)) - 4)
    nan = deltas_like(before, 1.0)
    next(iter(nan.values())).flat[0] = np.nan
    with pytest.raises(InvalidRequest, match="NaN"):
        upload(service, seats["c"], nan)
    too_big = to_raw_bytes(good) + b"\0" * 8
    with pytest.raises(TooLarge):
        upload(service, seats["b"], good, corrupt=too_big)
    with pytest.raises(InvalidRequest, match="sha256"):
        upload(service, seats["b"], good, corrupt=b"\1" * len(to_raw_bytes(good)))
    with pytest.raises(TooLarge, match="limit"):
        upload(service, seats["b"], good, declared=10**9)

    upload(service, seats["b"], deltas_like(before, 3.0))  # b may still report after its errors
    # c was rejected for NaN, so no device is pending: the round closes with 2 reports.
    after = model_params(service, task_id)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + 2.0, rtol=1e-6)
        assert np.isfinite(after[k]).all()
    with pytest.raises(Late):
        upload(service, seats["c"], good)


@pytest.mark.parametrize("sha, metrics, words", [
    ("", {}, "64 hex digits"),
    ("ab" * 31, {}, "64 hex digits"),
    (None, {"train_loss": 1e308}, r"at most 1e\+09 in magnitude"),
    (None, {"train_loss": float("inf")}, "not finite"),
])
def test_a_header_without_a_real_hash_or_with_absurd_metrics_is_refused(
    service: CoordinatorService, clock: ManualClock, sha: str | None,
    metrics: dict[str, float], words: str
) -> None:
    task_id = service.create_task(spec()).record.task_id
    p = admit(service, clock, task_id, ["a", "b", "c"])["a"]
    plan = service.get_plan(p)
    payload = bytes(sum(t.nbytes for t in plan.update_tensors))
    header = UpdateHeader(p, 10, list(plan.update_tensors), len(payload),
                          sha256_hex(payload) if sha is None else sha, metrics)
    with pytest.raises(InvalidRequest, match=words):
        service.begin_upload(header)
    upload(service, p, {t.name: np.zeros(t.shape, np.float32) for t in plan.update_tensors})


def test_a_round_short_of_min_reports_at_the_deadline_fails_and_is_redone(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec()).record.task_id
    before = model_params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    upload(service, seats["a"], deltas_like(before, 1.0))
    clock.advance(31)
    service.tick()
    rounds = service.list_rounds(task_id)
    assert rounds[0].state is RoundState.FAILED
    assert "deadline passed with 1 of the 2 reports needed" in rounds[0].failure_reason
    assert (rounds[1].round_number, rounds[1].attempt) == (1, 2)
    with pytest.raises(Late):
        upload(service, seats["b"], deltas_like(before, 1.0))
    np.testing.assert_array_equal(
        model_params(service, task_id)["linear.weight"], before["linear.weight"])


def test_after_the_deadline_enough_reports_are_aggregated(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec()).record.task_id
    before = model_params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    upload(service, seats["a"], deltas_like(before, 1.0))
    upload(service, seats["b"], deltas_like(before, 1.0))
    clock.advance(31)
    service.tick()
    assert service.list_rounds(task_id)[0].state is RoundState.COMMITTED


def test_the_task_completes_after_its_rounds_and_devices_are_told(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task_id = service.create_task(spec(rounds=1)).record.task_id
    before = model_params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    for p in seats.values():
        upload(service, p, deltas_like(before, 0.5))
    assert service.get_task(task_id).record.state is TaskState.COMPLETED
    assert service.check_in("a", ATTRS, task_id).outcome is CheckInOutcome.FINISHED


def test_a_restart_fails_the_open_round_and_redoes_it(
    store: InMemoryStore, clock: ManualClock, tmp_path: Path
) -> None:
    service = make_service(store, clock, tmp_path)
    task_id = service.create_task(spec()).record.task_id
    before = model_params(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    upload(service, seats["a"], deltas_like(before, 1.0))

    restarted = make_service(store, clock, tmp_path)
    restarted.recover()
    rounds = restarted.list_rounds(task_id)
    assert rounds[0].state is RoundState.FAILED and "restarted" in rounds[0].failure_reason
    assert (rounds[1].round_number, rounds[1].attempt, rounds[1].state) == (
        1, 2, RoundState.SELECTING)
    with pytest.raises(Late):
        upload(restarted, seats["b"], deltas_like(before, 1.0))
    seats2 = admit(restarted, clock, task_id, ["a", "b", "c"])
    for p in seats2.values():
        upload(restarted, p, deltas_like(before, 2.0))
    after = model_params(restarted, task_id)
    np.testing.assert_allclose(after["linear.weight"], before["linear.weight"] + 2.0, rtol=1e-6)


def test_unknown_model_architecture_is_refused_with_the_field(
    service: CoordinatorService,
) -> None:
    with pytest.raises(InvalidRequest, match="spec.model"):
        service.create_task(spec(model=ModelSpec("transformer-xl", {})))
