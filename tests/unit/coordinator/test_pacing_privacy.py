"""Pace steering and privacy sampling: a DP task whose selection window cannot see its
population at the coordinator's check-in pace (fixed-size q would rise, Poisson cohorts fall
short) is refused at launch, naming the window and the pace that would do. The real service
on a manual clock; no network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.pacing import PACE_MAX_S
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.privacy.accounting import Sampling
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.types import ModelSpec, TaskSpec

MODEL = ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3})


def _service(tmp_path: Path, pace: float) -> tuple[CoordinatorService, ManualClock]:
    clock = ManualClock()
    service = CoordinatorService(
        InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock, rng=random.Random(5),
        settings=CoordinatorSettings(checkin_pace_per_s=pace))
    return service, clock


def _dp(population: int, window_s: float, sampling: Sampling) -> TaskSpec:
    return TaskSpec(
        name="dp", model=MODEL, rounds=3, clients_per_round=4, min_reports=2,
        over_selection=1.0, round_deadline_s=120.0, selection_window_s=window_s,
        privacy=PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5,
                            clip=FixedClip(0.5), sampling=sampling, population=population,
                            max_epsilon=1000.0))


@pytest.mark.parametrize("sampling", [Sampling.POISSON, Sampling.FIXED_SIZE])
def test_a_dp_task_whose_window_cannot_see_its_population_at_the_pace_is_refused(
        tmp_path: Path, sampling: Sampling) -> None:
    service, _ = _service(tmp_path, pace=200.0)
    # 10,000 devices at 200/s: each checks in once in 50 s; a 10 s window sees ~2,000.
    with pytest.raises(InvalidRequest, match=r"selection_window_s to at least 50 s.*"
                                             r"--checkin-pace of at least 1e\+03"):
        service.create_task(_dp(10_000, 10.0, sampling))
    assert service.list_tasks() == []
    view = service.create_task(_dp(10_000, 50.0, sampling))
    assert any("sees the population of 10,000" in line for line in view.launch_checks)
    # Beyond pace x 60 s every device still checks in within the agent's 60 s.
    service.create_task(_dp(1_000_000, PACE_MAX_S, sampling))
    # Without pacing, or without privacy sampling, nothing is checked.
    unpaced, _ = _service(tmp_path / "unpaced", pace=0.0)
    unpaced.create_task(_dp(10_000, 1.0, sampling))
    plain = service.create_task(TaskSpec(name="plain", model=MODEL, rounds=1,
                                         clients_per_round=3, min_reports=3))
    assert not any("privacy sampling" in line for line in plain.launch_checks)
