"""Robust aggregation on the coordinator: clear uploads held whole and combined by the task's
``aggregation.robust`` rule at release; the refusals at launch (secure aggregation, DP, a
cohort of updates too large to hold)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.aggregators import (
    MAX_ROBUST_UPDATE_BYTES,
    ReleaseRefused,
    RobustAggregator,
)
from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.service import CoordinatorService
from coordinator.rounds.task_setup import check_supported
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.privacy.accounting import Sampling
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.protocol import CheckInOutcome, Participation, UpdateHeader
from core.tensors import load_safetensors, sha256_hex, to_raw_bytes
from core.types import (
    Aggregation,
    DeviceAttributes,
    ModelSpec,
    RobustAggregation,
    RobustKind,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskSpec,
)

ATTRS = DeviceAttributes()


def spec(rule: RobustAggregation, **kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="robust", model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=2, clients_per_round=5, min_reports=5, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0, aggregation=Aggregation(robust=rule))
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(7),
                              settings=CoordinatorSettings(max_chunk_bytes=1 << 16))


def admit(service: CoordinatorService, clock: ManualClock, task_id: str, devices: list[str]
          ) -> dict[str, Participation]:
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    seats = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        if r.outcome is CheckInOutcome.ACCEPTED:
            seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def upload(service: CoordinatorService, p: Participation, delta: dict[str, np.ndarray],
           num_examples: int = 10) -> None:
    plan = service.get_plan(p)
    payload = to_raw_bytes(delta)
    up = service.begin_upload(UpdateHeader(
        participation=p, num_examples=num_examples, tensors=list(plan.update_tensors),
        total_bytes=len(payload), sha256=sha256_hex(payload), metrics={"train_loss": 1.0}))
    up.write(payload)
    service.finish_upload(up)


def params(service: CoordinatorService, task_id: str) -> dict[str, np.ndarray]:
    rec = service.model_version(task_id, None)
    return load_safetensors(b"".join(service.model_chunks(rec, 1 << 20)))


def test_a_median_round_commits_the_coordinate_median_ignoring_an_outlier(
        service: CoordinatorService, clock: ManualClock) -> None:
    task_id = service.create_task(spec(RobustAggregation(kind=RobustKind.MEDIAN))).record.task_id
    before = params(service, task_id)
    seats = admit(service, clock, task_id, [f"d{i}" for i in range(5)])
    assert len(seats) == 5
    for value, seat in zip([1.0, 2.0, 3.0, 4.0, 200.0], seats.values(), strict=True):
        upload(service, seat, {k: np.full_like(v, value) for k, v in before.items()})
    after = params(service, task_id)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + 3.0, rtol=1e-6)
    committed = service.list_rounds(task_id)[0]
    assert committed.state is RoundState.COMMITTED
    assert committed.metrics["robust_kept"] == 5.0


def test_a_krum_round_commits_one_honest_update(service: CoordinatorService,
                                                clock: ManualClock) -> None:
    rule = RobustAggregation(kind=RobustKind.KRUM, byzantine=1)
    task_id = service.create_task(spec(rule)).record.task_id
    before = params(service, task_id)
    seats = admit(service, clock, task_id, [f"d{i}" for i in range(5)])
    for value, seat in zip([1.0, 1.01, 0.99, 1.02, -50.0], seats.values(), strict=True):
        upload(service, seat, {k: np.full_like(v, value) for k, v in before.items()})
    after = params(service, task_id)
    shift = {round(float(np.mean(after[k] - before[k])), 4) for k in before}
    assert shift <= {1.0, 1.01, 0.99, 1.02}
    assert service.list_rounds(task_id)[0].metrics["robust_kept"] == 1.0


def write(tmp_path: Path, name: str, values: np.ndarray) -> Path:
    path = tmp_path / name
    values.astype("<f4").tofile(path)
    return path


def test_the_robust_aggregator_reads_each_upload_whole_and_caps_weights(tmp_path: Path
                                                                        ) -> None:
    rule = RobustAggregation(kind=RobustKind.TRIMMED_MEAN, trim_fraction=0.0)
    agg = RobustAggregator(3, rule, weight_cap=20)
    agg.add_upload(write(tmp_path, "a", np.array([1.0, 1.0, 1.0])), 10, {"train_loss": 2.0})
    path = write(tmp_path, "b", np.array([4.0, 4.0, 4.0]))
    agg.add_upload(path, 1000, {"train_loss": 4.0})
    path.unlink()  # the spool file is gone after the upload: the update must be held
    out = agg.release(None)
    np.testing.assert_allclose(out.mean, [3.0, 3.0, 3.0])  # weights 10 and 20 (capped)
    assert out.metrics["examples"] == 30.0
    assert out.metrics["train_loss"] == pytest.approx((2 * 10 + 4 * 20) / 30)
    with pytest.raises(InvalidRequest, match="values"):
        agg.add_upload(write(tmp_path, "c", np.zeros(4)), 1, {})


def test_krum_with_too_few_reports_refuses_the_release(tmp_path: Path) -> None:
    agg = RobustAggregator(2, RobustAggregation(kind=RobustKind.KRUM, byzantine=1),
                           weight_cap=10)
    for i in range(4):
        agg.add_upload(write(tmp_path, str(i), np.full(2, float(i))), 1, {})
    with pytest.raises(ReleaseRefused, match=r"byzantine.*2f \+ 3 = 5.*has 4"):
        agg.release(None)
    with pytest.raises(ReleaseRefused, match="no update"):
        RobustAggregator(2, RobustAggregation(kind=RobustKind.MEDIAN), weight_cap=1).release(None)


SECURE = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001,
                           clip=0.5, phase_timeout_s=5.0)
CENTRAL = PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5,
                      clip=FixedClip(0.5), sampling=Sampling.FIXED_SIZE, population=100,
                      max_epsilon=1000.0)


@pytest.mark.parametrize("kind", [RobustKind.MEDIAN, RobustKind.TRIMMED_MEAN, RobustKind.KRUM,
                                  RobustKind.MULTI_KRUM])
def test_rules_that_need_every_update_are_refused_under_secure_aggregation(
        kind: RobustKind) -> None:
    with pytest.raises(InvalidRequest, match=r"spec.aggregation.robust.kind: .*secure "
                                             r"aggregation: the server only sees the masked sum"):
        check_supported(spec(RobustAggregation(kind=kind), secure_aggregation=SECURE))


def test_rules_other_than_the_mean_are_refused_under_central_dp() -> None:
    with pytest.raises(InvalidRequest, match=r"spec.aggregation.robust.kind: 'krum' .*central "
                                             r"DP"):
        check_supported(spec(RobustAggregation(kind=RobustKind.KRUM), privacy=CENTRAL))
    with pytest.raises(InvalidRequest, match=r"norm_bound: adaptive"):
        check_supported(spec(RobustAggregation(kind=RobustKind.NORM_BOUND), privacy=CENTRAL))
    with pytest.raises(InvalidRequest, match=r"set privacy.clip to the bound instead"):
        check_supported(spec(RobustAggregation(kind=RobustKind.NORM_BOUND, norm_bound=1.0),
                             privacy=CENTRAL))


def test_a_fixed_norm_bound_under_secure_aggregation_is_clipped_by_the_devices() -> None:
    from coordinator.rounds.task_setup import plan_privacy
    from core.protocol import PlanPrivacy

    bounded = spec(RobustAggregation(kind=RobustKind.NORM_BOUND, norm_bound=1.5),
                   secure_aggregation=SECURE)
    check_supported(bounded)
    assert plan_privacy(bounded, None) == PlanPrivacy(l2_clip_norm=1.5)
    assert plan_privacy(spec(RobustAggregation(), secure_aggregation=SECURE), None) is None
    with pytest.raises(InvalidRequest, match=r"norm_bound: adaptive"):
        check_supported(spec(RobustAggregation(kind=RobustKind.NORM_BOUND),
                             secure_aggregation=SECURE))


def test_a_cohort_of_updates_too_large_to_hold_is_refused_at_launch() -> None:
    big = ModelSpec("mlp", {"input_dim": 1000, "hidden": [1000], "num_classes": 10})
    rule = RobustAggregation(kind=RobustKind.MEDIAN)
    check_supported(spec(rule, model=big, clients_per_round=10, min_reports=1))
    too_many = MAX_ROBUST_UPDATE_BYTES // (4 * 1_011_010) + 1
    with pytest.raises(InvalidRequest, match=r"holds every update of a round in memory"):
        check_supported(spec(rule, model=big, clients_per_round=too_many, min_reports=1))
