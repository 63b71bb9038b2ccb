"""Pace steering keeps its promises: a device told to come back later by pacing that returns
early is offered to nothing until its time (a device ignoring its answers is seen no more
often than the honest ones). The real service on a manual clock; no network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.pacing import EARLY_TOLERANCE_S
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome
from core.types import DeviceAttributes, ModelSpec, TaskSpec

NOW = 1_700_000_000.0
ATTRS = DeviceAttributes()
MODEL = ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3})


def _service(tmp_path: Path, pace: float) -> tuple[CoordinatorService, ManualClock]:
    clock = ManualClock(NOW)
    service = CoordinatorService(
        InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock, rng=random.Random(5),
        settings=CoordinatorSettings(checkin_pace_per_s=pace, retry_after_max_s=5.0))
    return service, clock


def _paced_away(tmp_path: Path) -> tuple[CoordinatorService, ManualClock, str,
                                          dict[str, float]]:
    """A round whose 13 seats are taken by 600 candidates; the rest are told "round full",
    paced at 10/s: their returns are spread over the next 60 s. Returns each of those
    devices' promised return."""
    service, clock = _service(tmp_path, pace=10.0)
    task_id = service.create_task(TaskSpec(
        name="paced", model=MODEL, rounds=1, clients_per_round=10, min_reports=10,
        selection_window_s=2.0, round_deadline_s=30.0)).record.task_id
    devices = [f"d{i:04d}" for i in range(600)]
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(2.1)
    service.tick()
    promised = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        if r.outcome is CheckInOutcome.RETRY_LATER:
            promised[d] = clock.now() + r.retry_after_s
    assert len(promised) == 600 - 13
    return service, clock, task_id, promised


def test_a_device_back_before_its_paced_return_is_offered_to_no_window(
        tmp_path: Path) -> None:
    service, clock, task_id, promised = _paced_away(tmp_path)
    # The round fails at its deadline (nobody reports) and the next attempt's window opens
    # at NOW + 30 for 2 s.
    clock.advance(NOW + 30.0 - clock.now())
    service.tick()
    late = sorted(promised.items(), key=lambda kv: kv[1])
    cheater, cheater_at = late[-1]  # promised the longest wait: well after this window
    assert cheater_at > NOW + 45.0
    honest = [d for d, at in late if NOW + 30.0 <= at < NOW + 32.0 - 0.1][:10]
    assert len(honest) == 10
    answer = service.check_in(cheater, ATTRS, task_id)
    assert answer.outcome is CheckInOutcome.RETRY_LATER
    assert answer.retry_after_s == pytest.approx(cheater_at - clock.now())
    # The honest devices come back when told, inside the window: candidates.
    for d in honest:
        clock.advance(max(0.0, promised[d] - clock.now()))
        r = service.check_in(d, ATTRS, task_id)
        assert "selection window open" in r.message, r
    # The window closes: 10 were seen for 13 seats, so every one seen is seated,
    # but not the cheater, who was never offered; nor is it admitted late while early.
    clock.advance(NOW + 32.1 - clock.now())
    service.tick()
    assert all(service.check_in(d, ATTRS, task_id).outcome is CheckInOutcome.ACCEPTED
               for d in honest)
    again = service.check_in(cheater, ATTRS, task_id)
    assert again.outcome is CheckInOutcome.RETRY_LATER
    assert again.retry_after_s == pytest.approx(cheater_at - clock.now())
    # At its promised time it is served as anyone (here: a candidate of the window of the
    # attempt after, which opened as this one's deadline passed).
    clock.advance(cheater_at - clock.now())
    service.tick()
    assert "selection window open" in service.check_in(cheater, ATTRS, task_id).message


def test_an_early_device_cannot_trade_its_promise_for_a_shorter_one(tmp_path: Path) -> None:
    service, clock, task_id, promised = _paced_away(tmp_path)
    device, at = max(promised.items(), key=lambda kv: kv[1])
    # Claiming attributes that fit no task would normally be told to come back within 5 s
    # (NO_TASK): early, it still waits its time.
    for task in (task_id, None):
        r = service.check_in(device, DeviceAttributes(population="nobody"), task)
        assert r.outcome is CheckInOutcome.NO_TASK
        assert r.retry_after_s == pytest.approx(at - clock.now())
    clock.advance(at - EARLY_TOLERANCE_S - 1.0 - clock.now())
    assert "early" in service.check_in(device, ATTRS, task_id).message
    # Within the tolerance it is on time.
    clock.advance(1.0)
    assert "early" not in service.check_in(device, ATTRS, task_id).message


def test_honest_devices_and_small_populations_are_never_early(tmp_path: Path) -> None:
    service, clock, task_id, promised = _paced_away(tmp_path)
    for device, at in sorted(promised.items(), key=lambda kv: kv[1]):
        clock.advance(max(0.0, at - clock.now()))
        assert "early" not in service.check_in(device, ATTRS, task_id).message
    # Under the pace nothing is moved, so nothing is promised: devices may come back at
    # any time, as before pacing.
    small, small_clock = _service(tmp_path / "small", pace=200.0)
    small_task = small.create_task(TaskSpec(
        name="small", model=MODEL, rounds=1, clients_per_round=3, min_reports=3,
        selection_window_s=1.0, round_deadline_s=30.0)).record.task_id
    for _ in range(3):
        for d in range(20):
            assert "early" not in small.check_in(f"s{d}", ATTRS, small_task).message
        small_clock.advance(0.6)
        small.tick()
