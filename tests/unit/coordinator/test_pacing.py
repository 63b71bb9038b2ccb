"""Pace steering: "come back after" answers spread so that returns arrive at the pace, and
small populations hear the rules' answers unchanged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.pacing import PACE_MAX_S, CheckInPacer
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome
from core.types import DeviceAttributes, ModelSpec, TaskSpec

NOW = 1_700_000_000.0


def test_a_population_under_the_pace_keeps_the_answers_the_rules_give() -> None:
    pacer = CheckInPacer(100.0, free_s=5.0)
    # 500 answers in one instant fit in the 5 s of slack at 100/s.
    assert all(pacer.come_back_at(NOW, NOW + 2.0) == NOW + 2.0 for _ in range(500))
    assert pacer.ahead_s(NOW) == 0.0


def test_a_large_population_returns_at_the_pace() -> None:
    pacer = CheckInPacer(100.0, free_s=5.0)
    returns = np.array([pacer.come_back_at(NOW, NOW + 1.0) for _ in range(3000)])
    # Those within the slack come back when the rules said (NOW + 1); past it, one return
    # every 1/100 s: no later second holds more than 100.
    per_second = np.bincount((returns - NOW).astype(int))
    assert per_second[2:].max() <= 101
    assert returns.max() - NOW == pytest.approx(3000 / 100 - 5.0, abs=0.05)


def test_returns_settle_at_population_over_rate() -> None:
    """2,000 devices each checking in again when told: after a few cycles they arrive at
    the pace, each about every 2000 / 100 = 20 s."""
    pacer = CheckInPacer(100.0, free_s=5.0)
    rng = random.Random(0)
    due = sorted((rng.uniform(0, 5), d) for d in range(2000))
    arrivals = []
    for _ in range(2000 * 6):
        t, d = due.pop(0)
        arrivals.append(t)
        wait = pacer.come_back_at(NOW + t, NOW + t + rng.uniform(0.2, 5.0)) - NOW
        due.append((wait, d))
        due.sort()
    late = np.array(arrivals[2000 * 4:])
    rate = len(late) / (late.max() - late.min())
    assert 90 <= rate <= 110


def test_no_device_is_asked_to_wait_longer_than_the_agent_does() -> None:
    pacer = CheckInPacer(10.0, free_s=5.0)
    waits = [pacer.come_back_at(NOW, NOW + 1.0) - NOW for _ in range(5000)]
    assert max(waits) == pytest.approx(PACE_MAX_S)
    # An answer the rules give later than that keeps its own time.
    assert pacer.come_back_at(NOW, NOW + 100.0) == NOW + 100.0


def test_a_rate_of_zero_paces_nothing_and_a_bad_rate_is_refused() -> None:
    pacer = CheckInPacer(0.0, free_s=5.0)
    assert all(pacer.come_back_at(NOW, NOW + 0.2) == NOW + 0.2 for _ in range(10_000))
    with pytest.raises(ValueError, match="rate_per_s"):
        CheckInPacer(float("nan"), free_s=5.0)
    with pytest.raises(ValueError, match="rate_per_s"):
        CheckInPacer(-1.0, free_s=5.0)


def _service(tmp_path: Path, pace: float) -> tuple[CoordinatorService, ManualClock, str]:
    clock = ManualClock(NOW)
    service = CoordinatorService(
        InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock, rng=random.Random(3),
        settings=CoordinatorSettings(checkin_pace_per_s=pace, retry_after_max_s=5.0))
    task_id = service.create_task(TaskSpec(
        name="paced", model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=1, clients_per_round=10, min_reports=10, selection_window_s=2.0,
        round_deadline_s=30.0)).record.task_id
    return service, clock, task_id


def test_the_service_paces_full_round_answers_but_never_the_selection_window(
        tmp_path: Path) -> None:
    service, clock, task_id = _service(tmp_path, pace=50.0)
    devices = [f"d{i:04d}" for i in range(1000)]
    # In the window every device is a candidate, told to come back once it closed (in 2 s):
    # unpaced, but spread over up to retry_after_max_s as the window fills.
    window = [service.check_in(d, DeviceAttributes(), task_id) for d in devices]
    assert {r.outcome for r in window} == {CheckInOutcome.RETRY_LATER}
    waits = np.array([r.retry_after_s for r in window])
    assert waits.min() >= 2.05 and waits.max() <= 2.05 + 5.0
    assert waits[:10].max() < 2.05 + 1.0  # the first few: the window had seen few yet
    clock.advance(2.1)
    service.tick()
    answers = [service.check_in(d, DeviceAttributes(), task_id) for d in devices]
    seated = [r for r in answers if r.outcome is CheckInOutcome.ACCEPTED]
    full = [r.retry_after_s for r in answers if r.outcome is CheckInOutcome.RETRY_LATER]
    assert len(seated) == 13 and len(full) == 987  # 10 x over-selection 1.3
    # 987 "round full" answers at 50/s: the first 250 (5 s of slack) keep the rules'
    # answer (at most 5 s, jittered), the rest are spread up to ~987/50 - 5 s.
    assert sorted(full)[249] <= 6.0
    assert max(full) == pytest.approx(987 / 50 - 5.0, abs=0.5)


def test_without_pace_the_answers_stay_within_the_bound(tmp_path: Path) -> None:
    service, clock, task_id = _service(tmp_path, pace=0.0)
    devices = [f"d{i:04d}" for i in range(1000)]
    for d in devices:
        service.check_in(d, DeviceAttributes(), task_id)
    clock.advance(2.1)
    service.tick()
    answers = [service.check_in(d, DeviceAttributes(), task_id) for d in devices]
    assert max(r.retry_after_s for r in answers) <= 5.0 * 1.2
