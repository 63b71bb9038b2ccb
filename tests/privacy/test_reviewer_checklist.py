"""A privacy reviewer's checklist, one test per question, against the coordinator's own code
(the round service with its store; no component of ours is mocked).

1. Is selection the sampling the accountant assumes? Over 500 rounds of a task with 1000
   devices checking in in the same order every round, each device's selection count fits
   Binomial(500, 10/1000) (chi-square), whatever its place in the check-in order.
2. Does the accountant read what selection did, not a configured number? Every committed
   round's recorded draw (eligible, cohort, population, q) equals what selection did, and
   epsilon is recomputable from those records alone.
3. When fewer devices check in than the configured population, is q computed from what was
   seen?
4. Is anything per-device released or stored in the clear? Under DP no device metric or
   example count is stored or released; under secure aggregation no device metric or example
   count is stored, a metric sent in the clear is refused, and the released metrics are the
   masked sums' means.
5. Is anything outside the analysis refused at launch? No budget, Poisson with secure
   aggregation, a cohort larger than the population.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest, Unavailable
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.privacy import NoiseSource, Sampling
from core.privacy.accounting import MechanismSteps, epsilon_of_history
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.protocol import CheckInOutcome, MetricsPolicy, Participation, UpdateHeader
from core.tensors import sha256_hex
from core.types import (
    DeviceAttributes,
    ModelSpec,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskSpec,
    TaskState,
)

ATTRS = DeviceAttributes()
TINY = ModelSpec("logistic_regression", {"input_dim": 2, "num_classes": 2})


def central(population: int, **kw: object) -> PrivacySpec:
    base: dict[str, object] = dict(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5,
                                   clip=FixedClip(1.0), population=population,
                                   max_epsilon=1e9)
    base.update(kw)
    return PrivacySpec(**base)  # type: ignore[arg-type]


def task(**kw: object) -> TaskSpec:
    base: dict[str, object] = dict(name="checklist", model=TINY, rounds=1,
                                   clients_per_round=10, min_reports=1, over_selection=1.0,
                                   round_deadline_s=30.0, selection_window_s=1.0)
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


class Federation:
    """The round service with an in-memory store and a manual clock; devices are ids that
    check in (in a fixed order) and upload zero updates."""

    def __init__(self, tmp_path: Path, seed: int = 0) -> None:
        self.clock = ManualClock()
        self.store = InMemoryStore()
        # Check-in pacing off: every device of the population checks in within one window
        # here (the selection math under test), as at a coordinator whose pace carries them.
        self.service = CoordinatorService(
            self.store, FileBlobStore(tmp_path / "blobs"), self.clock, rng=random.Random(seed),
            noise=NoiseSource.seeded(seed),
            settings=CoordinatorSettings(allow_seeded_noise=True, checkin_pace_per_s=0))

    def select(self, task_id: str, devices: list[str]) -> dict[str, Participation]:
        """One selection window with ``devices`` checking in in this order; the seats."""
        for d in devices:
            self.service.check_in(d, ATTRS, task_id)
        self.clock.advance(1.1)
        self.service.tick()
        rnd = self.service.get_task(task_id).current_round
        assert rnd is not None
        seats = {}
        for part in self.store.list_participants(rnd.round_id):
            r = self.service.check_in(part.device_id, ATTRS, task_id)
            assert r.outcome is CheckInOutcome.ACCEPTED
            seats[part.device_id] = Participation(part.device_id, task_id, r.round_number,
                                                  r.token)
        return seats

    def upload(self, p: Participation, metrics: dict[str, float] | None = None) -> None:
        plan = self.service.get_plan(p)
        payload = np.zeros(sum(t.numel for t in plan.update_tensors), "<f4").tobytes()
        header = UpdateHeader(p, 7, list(plan.update_tensors), len(payload),
                              sha256_hex(payload), metrics or {})
        up = self.service.begin_upload(header)
        up.write(payload)
        self.service.finish_upload(up)


# ---------------------------------------------------------------- 1. selection is uniform


def test_every_device_is_selected_at_rate_q_whatever_its_place_in_the_check_in_order(
    tmp_path: Path,
) -> None:
    """500 devices, 10 per round, the same check-in order in each of 300 rounds (the old
    first-come candidate pool kept only the first 100: they had rate 0.1, the rest 0)."""
    population, per_round, rounds = 500, 10, 300
    fed = Federation(tmp_path, seed=12)
    tid = fed.service.create_task(task(
        rounds=rounds, privacy=central(population))).record.task_id
    devices = [f"device-{i:04d}" for i in range(population)]
    counts = dict.fromkeys(devices, 0)
    for _ in range(rounds):
        seats = fed.select(tid, devices)
        assert len(seats) == per_round
        for d, p in seats.items():
            counts[d] += 1
            fed.upload(p)
    assert fed.service.get_task(tid).record.rounds_committed == rounds
    observed = np.array([counts[d] for d in devices])
    expected = rounds * per_round / population  # 6 per device: q = 0.02
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    p_value = float(stats.chi2.sf(chi2, df=population - 1))
    assert p_value > 1e-3, f"selection counts are not uniform: chi2 {chi2:.0f}, p {p_value:.2g}"
    # No device is starved or favoured beyond Binomial(300, 0.02) tails over 500 devices.
    low, high = stats.binom.ppf([1e-6, 1 - 1e-6], rounds, per_round / population)
    assert low <= observed.min() and observed.max() <= high
    # Position in the check-in order does not matter: first and last 100 alike.
    assert abs(observed[:100].mean() - observed[-100:].mean()) < 1.5


# ---------------------------------------------------------------- 2-3. what the accountant reads


def test_the_accountant_reads_the_draw_each_round_made(tmp_path: Path) -> None:
    fed = Federation(tmp_path, seed=3)
    tid = fed.service.create_task(task(rounds=3, privacy=central(200))).record.task_id
    seen = [150, 200, 120]  # devices that check in, per round
    for n in seen:
        for p in fed.select(tid, [f"d{i}" for i in range(n)]).values():
            fed.upload(p)
    rounds = [r for r in fed.service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert len(rounds) == 3
    steps = []
    for r, n in zip(rounds, seen, strict=True):
        admitted = len(fed.store.list_participants(r.round_id))
        m = r.metrics
        assert m["dp_eligible"] == n and m["dp_cohort"] == admitted == 10
        assert m["dp_population"] == min(n, 200)  # q from what was seen, never smaller
        assert m["dp_sampling_rate"] == pytest.approx(10 / min(n, 200))
        steps.append(MechanismSteps(1.0, m["dp_sampling_rate"], 1,
                                    population=int(m["dp_population"]),
                                    sample_size=int(m["dp_cohort"])))
    # Epsilon is recomputable from the stored draws alone, and is what the task reports.
    expected = epsilon_of_history(steps, delta=1e-5, sampling=Sampling.FIXED_SIZE)
    assert rounds[-1].metrics["dp_epsilon"] == pytest.approx(expected)
    status = fed.service.get_task(tid).privacy
    assert status is not None and status.epsilon == pytest.approx(expected)
    assert status.budget == 1e9 and status.sampling is Sampling.FIXED_SIZE
    assert status.last_draw is not None and status.last_draw.eligible == 120


def test_too_few_devices_for_the_budget_fail_the_round_before_anyone_trains(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    # Planned: 10 of 1000 (q = 0.01, epsilon 0.99 a round at z = 2) fits the budget; 12
    # devices seen makes q = 10/12 (epsilon 4.7).
    tid = fed.service.create_task(task(rounds=5, privacy=central(
        1000, max_epsilon=2.0, noise_multiplier=2.0))).record.task_id
    for d in [f"d{i}" for i in range(12)]:
        fed.service.check_in(d, ATTRS, tid)
    fed.clock.advance(1.1)
    fed.service.tick()
    failed = fed.service.list_rounds(tid)[0]
    assert failed.state is RoundState.FAILED
    assert "only 12 eligible devices" in failed.failure_reason
    assert fed.store.list_participants(failed.round_id) == []  # nobody was admitted


# ---------------------------------------------------------------- 4. nothing per device


def test_under_dp_no_device_metric_or_example_count_is_stored_or_released(
    tmp_path: Path,
) -> None:
    fed = Federation(tmp_path)
    tid = fed.service.create_task(task(privacy=central(50))).record.task_id
    seats = fed.select(tid, [f"d{i}" for i in range(50)])
    first = next(iter(seats.values()))
    assert fed.service.get_plan(first).metrics is MetricsPolicy.WITHHELD
    with pytest.raises(InvalidRequest, match="withholds per-device metrics"):
        fed.upload(first, {"train_loss": 0.3})
    for p in seats.values():
        fed.upload(p)
    rnd = fed.service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED
    for part in fed.store.list_participants(rnd.round_id):
        assert part.num_examples == 0 and dict(part.metrics) == {}
    released = set(rnd.metrics)
    assert not released & {"examples", "train_loss", "eval_loss", "eval_accuracy"}
    assert {"dp_epsilon", "dp_sampling_rate", "dp_cohort"} <= released
    assert fed.service.get_task(tid).metrics is MetricsPolicy.WITHHELD


def test_under_secure_aggregation_metrics_are_refused_in_the_clear(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    secure = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001)
    tid = fed.service.create_task(task(clients_per_round=5, min_reports=3,
                                       secure_aggregation=secure)).record.task_id
    seats = fed.select(tid, [f"d{i}" for i in range(8)])
    p = next(iter(seats.values()))
    assert fed.service.get_plan(p).metrics is MetricsPolicy.MASKED
    with pytest.raises(InvalidRequest, match="never in the clear"):
        fed.upload(p)
    with pytest.raises(InvalidRequest, match="inside its masked vector"):
        fed.service.secagg_masked_input(p, np.zeros(3, np.uint32), {"train_loss": 1.0}, 0)
    assert fed.service.get_task(tid).metrics is MetricsPolicy.MASKED


# ---------------------------------------------------------------- 5. refused at launch


@pytest.mark.parametrize("spec, message", [
    (task(privacy=central(100, max_epsilon=None)), "needs a budget"),
    (task(privacy=central(100, sampling=Sampling.POISSON),
          secure_aggregation=SecureAggregation()), "poisson"),
    (task(clients_per_round=10, over_selection=1.5, privacy=central(12)),
     "cannot supply a cohort of 15"),
])
def test_what_the_analysis_does_not_cover_is_refused_at_launch(
    tmp_path: Path, spec: TaskSpec, message: str
) -> None:
    fed = Federation(tmp_path)
    with pytest.raises(InvalidRequest, match=message):
        fed.service.create_task(spec)
    assert fed.service.list_tasks() == []


def test_poisson_sampling_is_what_the_coordinator_does_when_asked(tmp_path: Path) -> None:
    """Each device independently with p = 10/100: cohort sizes vary, the mean is 10."""
    fed = Federation(tmp_path, seed=8)
    rounds = 60
    tid = fed.service.create_task(task(rounds=rounds, privacy=central(
        100, sampling=Sampling.POISSON))).record.task_id
    sizes = []
    for _ in range(rounds):
        seats = fed.select(tid, [f"d{i}" for i in range(100)])
        sizes.append(len(seats))
        for p in seats.values():
            fed.upload(p)
    committed = [r for r in fed.service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert all(r.metrics["dp_sampling_rate"] == pytest.approx(0.1) for r in committed)
    assert len(set(sizes)) > 3  # a random cohort size, as Poisson sampling has
    assert np.mean(sizes) == pytest.approx(10, abs=1.5)


def test_a_stored_dp_task_without_a_budget_ends_at_restart_with_the_reason(
    tmp_path: Path,
) -> None:
    """A task stored by an older version (a DP task with no budget) never runs on unchecked:
    recovery ends it as failed, and reading it gives UNAVAILABLE naming the field."""
    fed = Federation(tmp_path)
    tid = fed.service.create_task(task(privacy=central(50))).record.task_id
    stored = json.loads(fed.store.get_task(tid).spec_json)
    del stored["privacy"]["max_epsilon"]
    model = fed.service.model_version(tid, 0)
    legacy = "legacy-0001"
    fed.store.create_task(legacy, json.dumps(stored),
                          dataclasses.replace(model, task_id=legacy), fed.clock.now())
    restarted = CoordinatorService(fed.store, FileBlobStore(tmp_path / "blobs"), fed.clock,
                                   rng=random.Random(0), noise=NoiseSource.seeded(0),
                                   settings=CoordinatorSettings(allow_seeded_noise=True))
    restarted.recover()
    record = fed.store.get_task(legacy)
    assert record.state is TaskState.FAILED and "max_epsilon" in record.reason
    with pytest.raises(Unavailable, match="privacy.max_epsilon"):
        restarted.get_task(legacy)
    assert restarted.get_task(tid).record.state is TaskState.RUNNING
