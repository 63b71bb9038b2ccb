"""Pace steering: "come back after" answers spread so that returns arrive at the pace, and
small populations hear the rules' answers unchanged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.pacing import EARLY_TOLERANCE_S, PACE_MAX_S, CheckInPacer
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome
from core.types import DeviceAttributes, ModelSpec, TaskSpec

NOW = 1_700_000_000.0


def test_a_population_under_the_pace_keeps_the_answers_the_rules_give() -> None:
    pacer = CheckInPacer(100.0)
    # 100 answers in one instant fit in one second at 100/s.
    assert all(pacer.come_back_at(NOW, NOW + 2.0) == NOW + 2.0 for _ in range(100))
    assert pacer.booked(NOW, 60) == 100


def test_a_large_population_returns_at_the_pace() -> None:
    pacer = CheckInPacer(100.0, rng=random.Random(1))
    returns = np.array([pacer.come_back_at(NOW, NOW + 1.0) for _ in range(3000)])
    # No second holds more than 100 returns: 3,000 fill the 30 seconds from NOW + 1 on.
    per_second = np.bincount((returns - NOW).astype(int))
    assert per_second.max() <= 100
    assert returns.min() == NOW + 1.0 and returns.max() < NOW + 31.0


def test_returns_settle_at_population_over_rate() -> None:
    """2,000 devices each checking in again when told: after a few cycles they arrive at
    the pace, each about every 2000 / 100 = 20 s."""
    pacer = CheckInPacer(100.0, rng=random.Random(2))
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
    assert 90 <= rate <= 105


def test_returns_fixed_by_the_rules_are_booked_and_paced_ones_go_around_them() -> None:
    pacer = CheckInPacer(100.0, rng=random.Random(3))
    for _ in range(500):  # a selection window's candidates, all back at its close
        pacer.book(NOW + 10.2)
    assert pacer.come_back_at(NOW, NOW + 10.5) >= NOW + 11.0
    assert pacer.come_back_at(NOW, NOW + 3.0) == NOW + 3.0


def test_no_device_is_asked_to_wait_longer_than_the_agent_does() -> None:
    pacer = CheckInPacer(10.0, rng=random.Random(4))
    waits = np.array([pacer.come_back_at(NOW, NOW + 1.0) - NOW for _ in range(5000)])
    assert waits.max() <= PACE_MAX_S
    # Past the horizon's 600 places, the rest are spread over its last half (no herd).
    over = waits[600:]
    assert over.min() >= PACE_MAX_S / 2 and np.histogram(over, bins=6)[0].min() > 400
    # An answer the rules give later than that keeps its own time.
    assert pacer.come_back_at(NOW, NOW + 100.0) == NOW + 100.0


def test_a_rate_of_zero_paces_nothing_and_a_bad_rate_is_refused() -> None:
    pacer = CheckInPacer(0.0)
    assert all(pacer.come_back_at(NOW, NOW + 0.2) == NOW + 0.2 for _ in range(10_000))
    with pytest.raises(ValueError, match="rate_per_s"):
        CheckInPacer(float("nan"))
    with pytest.raises(ValueError, match="rate_per_s"):
        CheckInPacer(-1.0)


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
    # unpaced, but spread as the window fills, at (devices seen) / pace, at most a quarter
    # of the time from the close to the deadline (28 s / 4 = 7 s).
    window = [service.check_in(d, DeviceAttributes(), task_id) for d in devices]
    assert {r.outcome for r in window} == {CheckInOutcome.RETRY_LATER}
    waits = np.array([r.retry_after_s for r in window])
    assert waits.min() >= 2.05 and waits.max() <= 2.05 + 7.0
    assert waits[:10].max() < 2.05 + 1.0  # the first few: the window had seen few yet
    clock.advance(2.1)
    service.tick()
    answers = [service.check_in(d, DeviceAttributes(), task_id) for d in devices]
    seated = [r for r in answers if r.outcome is CheckInOutcome.ACCEPTED]
    full = np.array([r.retry_after_s for r in answers
                     if r.outcome is CheckInOutcome.RETRY_LATER])
    assert len(seated) == 13 and len(full) == 987  # 10 x over-selection 1.3
    # "Round full" answers (come back after 5 s by the rules, jittered) are spread at
    # 50 per second around the candidates' returns still booked: no second holds more.
    returns = np.floor(NOW + 2.1 + full).astype(int)
    assert np.unique(returns, return_counts=True)[1].max() <= 50
    assert full.min() >= 5.0 and full.max() <= 5.0 * 1.2 + (1000 + 987) / 50


def test_without_pace_the_answers_stay_within_the_bound(tmp_path: Path) -> None:
    service, clock, task_id = _service(tmp_path, pace=0.0)
    devices = [f"d{i:04d}" for i in range(1000)]
    for d in devices:
        service.check_in(d, DeviceAttributes(), task_id)
    clock.advance(2.1)
    service.tick()
    answers = [service.check_in(d, DeviceAttributes(), task_id) for d in devices]
    assert max(r.retry_after_s for r in answers) <= 5.0 * 1.2


@pytest.mark.parametrize("rate", [0.5, 0.3, 2.5, 7.25])
def test_a_fractional_rate_is_kept_exactly_never_rounded_up(rate: float) -> None:
    pacer = CheckInPacer(rate, rng=random.Random(5))
    returns = np.array([pacer.come_back_at(NOW, NOW + 1.0) for _ in range(int(rate * 50))])
    # Over the 50 s they fill, the returns come at the rate, at most one second's rounding
    # off: 0.5/s is one every other second, not one a second.
    span = returns.max() - NOW
    assert 50 - 2 <= span <= 50 + 2
    per_second = np.bincount((returns - NOW).astype(int))
    assert per_second.max() <= np.ceil(rate)
    assert max(per_second[i:i + 10].sum() for i in range(0, 40)) <= rate * 10 + 1


def test_the_horizon_is_the_agents_longest_wait() -> None:
    with pytest.raises(ValueError, match="max_s"):
        CheckInPacer(10.0, max_s=PACE_MAX_S + 1)
    pacer = CheckInPacer(10.0, rng=random.Random(6))
    pacer.promise("d", NOW, NOW + 600.0)
    # A promise past the agent's longest wait is kept as that wait: it comes back then.
    assert pacer.early("d", NOW + PACE_MAX_S - EARLY_TOLERANCE_S) is None
    assert pacer.early("d", NOW + 30.0) == NOW + PACE_MAX_S


def test_promises_are_remembered_only_while_they_are_due() -> None:
    pacer = CheckInPacer(10.0, rng=random.Random(7))
    for i in range(1000):
        pacer.promise(f"d{i}", NOW, NOW + 1.0 + i * 0.05)
    assert pacer.promises() == 1000
    assert pacer.early("d999", NOW + 40.0) == pytest.approx(NOW + 1.0 + 999 * 0.05)
    assert pacer.early("d0", NOW + 1.0 - EARLY_TOLERANCE_S) is None
    pacer.forget("d999")
    assert pacer.early("d999", NOW + 40.0) is None
    # Pruned with the calendar's seconds: past ones are forgotten.
    pacer.come_back_at(NOW + 30.0, NOW + 31.0)
    assert pacer.promises() == sum(1 for i in range(999) if 1.0 + i * 0.05 >= 30.0)
    # With pacing off nothing is remembered.
    off = CheckInPacer(0.0)
    off.promise("d", NOW, NOW + 10.0)
    assert off.promises() == 0 and off.early("d", NOW) is None
