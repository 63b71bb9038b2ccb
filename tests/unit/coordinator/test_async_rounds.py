"""Asynchronous FedBuff on the coordinator (:mod:`coordinator.rounds.asynchronous`), on the
real service with a manual clock and an in-memory store: no network, no sleeps."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest, Late
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.privacy import Sampling, epsilon
from core.privacy.clipping import l2_norm
from core.privacy.spec import LocalDp, PrivacyMode, PrivacySpec
from core.protocol import CheckInOutcome, MetricsPolicy, Participation
from core.taskspec import TaskSpecError
from core.types import (
    Aggregation,
    AggregationMode,
    RobustAggregation,
    RobustKind,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    Staleness,
    StalenessKind,
    TaskSpec,
    TaskState,
)
from tests.unit.coordinator.test_privacy_rounds import BIG as DP_MODEL
from tests.unit.coordinator.test_privacy_rounds import central as dp_central
from tests.unit.coordinator.test_privacy_rounds import flat_params, size_of
from tests.unit.coordinator.test_privacy_rounds import make_service as make_dp_service
from tests.unit.coordinator.test_privacy_rounds import upload as dp_upload
from tests.unit.coordinator.test_round_service import (
    ATTRS,
    deltas_like,
    model_params,
    spec,
    upload,
)

W = "linear.weight"


def async_spec(*, buffer: int = 2, concurrency: int = 3, max_staleness: int = 1,
               exponent: float = 1.0, **kw: object) -> TaskSpec:
    aggregation = Aggregation(
        mode=AggregationMode.ASYNC, buffer=buffer, max_concurrency=concurrency,
        staleness=Staleness(StalenessKind.POLYNOMIAL, exponent=exponent),
        max_staleness=max_staleness)
    base: dict[str, object] = dict(rounds=3, aggregation=aggregation, round_deadline_s=30.0)
    base.update(kw)
    return spec(**base)


def make_service(store: InMemoryStore, clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(store, FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(7), settings=CoordinatorSettings(max_chunk_bytes=64))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store() -> InMemoryStore:
    return InMemoryStore()


@pytest.fixture
def service(store: InMemoryStore, clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return make_service(store, clock, tmp_path)


def seat(service: CoordinatorService, task_id: str, device: str) -> Participation:
    r = service.check_in(device, ATTRS, task_id)
    assert r.outcome is CheckInOutcome.ACCEPTED, r.message
    return Participation(device, task_id, r.round_number, r.token)


def test_devices_are_seated_at_once_up_to_max_concurrency(service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(concurrency=3)).record.task_id
    for d in ("a", "b", "c"):
        seat(service, task_id, d)  # no selection window: admitted at the first check-in
    r = service.check_in("d", ATTRS, task_id)
    assert r.outcome is CheckInOutcome.RETRY_LATER
    assert "max_concurrency" in r.message and r.retry_after_s > 0
    rnd = service.list_rounds(task_id)[-1]
    assert (rnd.round_number, rnd.state, rnd.selected) == (1, RoundState.TRAINING, 3)


def test_a_version_commits_every_buffer_updates_with_the_plain_mean(
        service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(buffer=2)).record.task_id
    v0 = model_params(service, task_id)
    a, b = seat(service, task_id, "a"), seat(service, task_id, "b")
    assert service.get_plan(a).model_version == 0
    upload(service, a, deltas_like(v0, 1.0), num_examples=10)
    assert service.model_version(task_id, None).version == 0  # the buffer holds one of two
    upload(service, b, deltas_like(v0, 3.0), num_examples=30)
    assert service.model_version(task_id, None).version == 1
    np.testing.assert_allclose(model_params(service, task_id)[W], v0[W] + 2.5, rtol=1e-6)
    committed = service.list_rounds(task_id)[0]
    assert committed.state is RoundState.COMMITTED
    assert committed.metrics["staleness_mean"] == 0.0 and committed.metrics["late"] == 0.0


def test_stale_updates_are_scaled_by_the_staleness_weight_and_not_renormalised(
        service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(buffer=2, exponent=1.0)).record.task_id
    v0 = model_params(service, task_id)
    a, b, c = (seat(service, task_id, d) for d in ("a", "b", "c"))
    upload(service, a, deltas_like(v0, 1.0))
    upload(service, b, deltas_like(v0, 1.0))  # version 1 = v0 + 1
    # c trained on version 0: one version stale, weight (1 + 1) ** -1 = 0.5
    plan = service.get_plan(c)
    assert (plan.round_number, plan.model_version) == (1, 0)
    assert service.model_for_participant(c, 0).version == 0
    d = seat(service, task_id, "d")  # trains on version 1
    assert (d.round_number, service.get_plan(d).model_version) == (2, 1)
    upload(service, c, deltas_like(v0, 1.0), num_examples=10)
    upload(service, d, deltas_like(v0, 1.0), num_examples=10)
    # (10 x 0.5 x 1 + 10 x 1 x 1) / 20 = 0.75: the stale update moves the model less
    np.testing.assert_allclose(model_params(service, task_id)[W], v0[W] + 1.75, rtol=1e-6)
    version2 = service.list_rounds(task_id)[1]
    assert version2.metrics["staleness_mean"] == 0.5 and version2.metrics["staleness_max"] == 1


def test_an_update_staler_than_max_staleness_is_rejected_as_late(
        service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(buffer=1, max_staleness=1)).record.task_id
    v0 = model_params(service, task_id)
    slow = seat(service, task_id, "slow")
    upload(service, seat(service, task_id, "a"), deltas_like(v0, 1.0))  # version 1
    upload(service, seat(service, task_id, "b"), deltas_like(v0, 1.0))  # version 2
    with pytest.raises(Late, match=r"2 versions old.*max_staleness of 1"):
        upload(service, slow, deltas_like(v0, 100.0))
    assert service.model_version(task_id, None).version == 2
    np.testing.assert_allclose(model_params(service, task_id)[W], v0[W] + 2.0, rtol=1e-6)
    # Its seat is freed, and it may take a fresh one in the next version.
    r = service.check_in("slow", ATTRS, task_id)
    assert r.outcome is CheckInOutcome.RETRY_LATER and "already took part" in r.message
    upload(service, seat(service, task_id, "c"), deltas_like(v0, 1.0))  # version 3: done
    assert service.list_rounds(task_id)[2].metrics["late"] == 1.0


def test_a_device_contributes_once_per_version(service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(buffer=2)).record.task_id
    v0 = model_params(service, task_id)
    upload(service, seat(service, task_id, "a"), deltas_like(v0, 1.0))
    r = service.check_in("a", ATTRS, task_id)
    assert r.outcome is CheckInOutcome.RETRY_LATER and "once it is committed" in r.message
    upload(service, seat(service, task_id, "b"), deltas_like(v0, 1.0))
    assert seat(service, task_id, "a").round_number == 2  # a new version: a new seat


def test_the_task_completes_after_rounds_versions(service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(buffer=1, rounds=2)).record.task_id
    v0 = model_params(service, task_id)
    carried = seat(service, task_id, "z")
    for d in ("a", "b"):
        upload(service, seat(service, task_id, d), deltas_like(v0, 1.0))
    view = service.get_task(task_id)
    assert view.record.state is TaskState.COMPLETED and view.record.rounds_committed == 2
    assert [r.state for r in service.list_rounds(task_id)] == [RoundState.COMMITTED] * 2
    with pytest.raises(Late):
        upload(service, carried, deltas_like(v0, 1.0))
    assert service.check_in("c", ATTRS, task_id).outcome is CheckInOutcome.FINISHED


def test_a_seat_without_an_update_expires_after_round_deadline_s(
        service: CoordinatorService, clock: ManualClock) -> None:
    task_id = service.create_task(async_spec(concurrency=2, round_deadline_s=30.0)
                                  ).record.task_id
    v0 = model_params(service, task_id)
    a = seat(service, task_id, "a")
    clock.advance(10.0)
    seat(service, task_id, "b")
    assert service.check_in("c", ATTRS, task_id).outcome is CheckInOutcome.RETRY_LATER
    assert service.get_plan(a).deadline == pytest.approx(clock.now() - 10.0 + 30.0)
    clock.advance(20.5)  # a's seat expired, b's has 9.5 s left
    c = seat(service, task_id, "c")
    with pytest.raises(Late, match="seat expired"):
        upload(service, a, deltas_like(v0, 1.0))
    upload(service, c, deltas_like(v0, 1.0))
    seat(service, task_id, "d")  # c's report freed its seat too
    assert service.check_in("e", ATTRS, task_id).outcome is CheckInOutcome.RETRY_LATER


def test_seats_in_flight_carry_over_to_the_next_version(service: CoordinatorService) -> None:
    task_id = service.create_task(async_spec(buffer=1, concurrency=2)).record.task_id
    v0 = model_params(service, task_id)
    slow = seat(service, task_id, "slow")
    upload(service, seat(service, task_id, "a"), deltas_like(v0, 1.0))  # version 1
    version2 = service.list_rounds(task_id)[-1]
    assert (version2.round_number, version2.selected) == (2, 1)  # slow holds a seat there
    assert service.check_in("slow", ATTRS, task_id).token == slow.token
    upload(service, slow, deltas_like(v0, 1.0))  # one version stale: weight 0.5
    np.testing.assert_allclose(model_params(service, task_id)[W], v0[W] + 1.5, rtol=1e-6)


def test_a_restart_loses_only_the_uncommitted_buffer_and_never_commits_twice(
        store: InMemoryStore, clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(store, clock, tmp_path)
    task_id = service.create_task(async_spec(buffer=2)).record.task_id
    v0 = model_params(service, task_id)
    a, b = seat(service, task_id, "a"), seat(service, task_id, "b")
    upload(service, a, deltas_like(v0, 1.0))
    upload(service, b, deltas_like(v0, 1.0))  # version 1, durable
    in_flight = seat(service, task_id, "c")
    upload(service, seat(service, task_id, "a"), deltas_like(v0, 5.0))  # buffered only

    restarted = make_service(store, clock, tmp_path)
    restarted.recover()
    rounds = restarted.list_rounds(task_id)
    assert [(r.round_number, r.state) for r in rounds] == [
        (1, RoundState.COMMITTED), (2, RoundState.FAILED), (2, RoundState.TRAINING)]
    assert restarted.model_version(task_id, None).version == 1
    with pytest.raises(Late, match="closed"):
        upload(restarted, in_flight, deltas_like(v0, 1.0))
    for d in ("a", "c"):
        upload(restarted, seat(restarted, task_id, d), deltas_like(v0, 2.0))
    assert restarted.model_version(task_id, None).version == 2
    np.testing.assert_allclose(model_params(restarted, task_id)[W], v0[W] + 3.0, rtol=1e-6)
    assert [r.round_number for r in restarted.list_rounds(task_id)
            if r.state is RoundState.COMMITTED] == [1, 2]


SECURE = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001,
                           clip=0.5, phase_timeout_s=5.0)


def test_async_with_secure_aggregation_is_refused_at_launch(
        service: CoordinatorService) -> None:
    with pytest.raises(InvalidRequest, match="spec.aggregation.mode: 'async' cannot run with "
                                             "secure_aggregation: SecAgg.* fixed group"):
        service.create_task(async_spec(secure_aggregation=SECURE))


@pytest.mark.parametrize(("privacy", "why"), [
    (dp_central(sampling=Sampling.POISSON),
     "spec.privacy.sampling: 'poisson' does not apply to aggregation.mode 'async'"),
    (dp_central(mode=PrivacyMode.DISTRIBUTED),
     "spec.privacy.mode: 'distributed' needs secure aggregation"),
])
def test_async_privacy_the_analysis_does_not_cover_is_refused_at_launch(
        service: CoordinatorService, privacy: PrivacySpec, why: str) -> None:
    with pytest.raises((InvalidRequest, TaskSpecError), match=why):
        service.create_task(async_spec(privacy=privacy))


# -- central DP: one noised release per version, no amplification claimed -------------------

def dp_service(tmp_path: Path, clock: ManualClock) -> CoordinatorService:
    return make_dp_service(tmp_path, clock)


def dp_async_spec(**privacy: object) -> TaskSpec:
    return async_spec(buffer=2, concurrency=3, max_staleness=2, exponent=1.0,
                      model=DP_MODEL, privacy=dp_central(**privacy))


def whole_population_epsilon(versions: int, z: float = 1.0) -> float:
    """Every version is a Gaussian release of sensitivity 2C (replace-one, nobody sampled)."""
    return epsilon(noise_multiplier=z / 2, sampling_rate=1.0, steps=versions, delta=1e-5)


def test_async_central_dp_clips_weighs_by_staleness_and_divides_by_the_buffer(
        clock: ManualClock, tmp_path: Path) -> None:
    service = dp_service(tmp_path, clock)
    task_id = service.create_task(dp_async_spec(noise_multiplier=1e-6, max_epsilon=1e300)
                                  ).record.task_id
    before = flat_params(service, task_id)
    a, b, c = (seat(service, task_id, d) for d in ("a", "b", "c"))
    n = size_of(service, a)
    big = np.full(n, 1.0, np.float32)  # norm ~44.8, clipped to C = 0.5
    dp_upload(service, a, big)
    dp_upload(service, b, big)  # version 1: (C + C) / 2 in norm
    first = flat_params(service, task_id) - before
    assert l2_norm(first) == pytest.approx(0.5, rel=1e-4)
    d = seat(service, task_id, "d")
    dp_upload(service, c, big)  # trained on version 0: weight (1 + 1) ** -1 = 0.5
    dp_upload(service, d, big)
    second = flat_params(service, task_id) - before - first
    assert l2_norm(second) == pytest.approx((0.5 * 0.5 + 0.5) / 2, rel=1e-4)
    versions = [r for r in service.list_rounds(task_id) if r.state is RoundState.COMMITTED]
    assert versions[1].metrics["staleness_max"] == 1.0


def test_async_central_dp_accounts_each_version_as_a_release_over_the_whole_population(
        clock: ManualClock, tmp_path: Path) -> None:
    service = dp_service(tmp_path, clock)
    task_id = service.create_task(dp_async_spec()).record.task_id
    for version in (1, 2):
        p, q = seat(service, task_id, f"a{version}"), seat(service, task_id, f"b{version}")
        n = size_of(service, p)
        dp_upload(service, p, np.zeros(n, np.float32))
        dp_upload(service, q, np.zeros(n, np.float32))
    committed = [r for r in service.list_rounds(task_id) if r.state is RoundState.COMMITTED]
    assert [r.metrics["dp_epsilon"] for r in committed] == pytest.approx(
        [whole_population_epsilon(1), whole_population_epsilon(2)], rel=1e-9)
    m = committed[-1].metrics
    assert (m["dp_sampling_rate"], m["dp_cohort"], m["dp_population"]) == (1.0, 100.0, 100.0)
    # Nothing per device: no example count, no device metric, no loss.
    assert not {"examples", "train_loss", "eval_loss"} & set(m)
    status = service.get_task(task_id).privacy
    assert status is not None and status.epsilon == pytest.approx(whole_population_epsilon(2))
    assert service.get_task(task_id).metrics is MetricsPolicy.WITHHELD


def test_async_central_dp_refuses_device_metrics(clock: ManualClock, tmp_path: Path) -> None:
    service = dp_service(tmp_path, clock)
    task_id = service.create_task(dp_async_spec()).record.task_id
    a = seat(service, task_id, "a")
    assert service.get_plan(a).metrics is MetricsPolicy.WITHHELD
    with pytest.raises(InvalidRequest, match="withholds per-device metrics"):
        dp_upload(service, a, np.zeros(size_of(service, a), np.float32), {"train_loss": 0.3})


def test_async_central_dp_stops_at_its_budget_before_a_version_would_pass_it(
        clock: ManualClock, tmp_path: Path) -> None:
    service = dp_service(tmp_path, clock)
    budget = (whole_population_epsilon(1) + whole_population_epsilon(2)) / 2
    task_id = service.create_task(dp_async_spec(max_epsilon=budget)).record.task_id
    a, b = seat(service, task_id, "a"), seat(service, task_id, "b")
    n = size_of(service, a)
    dp_upload(service, a, np.zeros(n, np.float32))
    dp_upload(service, b, np.zeros(n, np.float32))
    record = service.get_task(task_id).record
    assert record.state is TaskState.BUDGET_EXHAUSTED and record.rounds_committed == 1
    assert "privacy budget exhausted after 1 rounds" in record.reason


def test_async_central_dp_epsilon_survives_a_restart(clock: ManualClock, tmp_path: Path
                                                     ) -> None:
    store = InMemoryStore()
    service = make_dp_service(tmp_path, clock, store=store)
    task_id = service.create_task(dp_async_spec()).record.task_id
    a, b = seat(service, task_id, "a"), seat(service, task_id, "b")
    n = size_of(service, a)
    dp_upload(service, a, np.zeros(n, np.float32))
    dp_upload(service, b, np.zeros(n, np.float32))
    restarted = make_dp_service(tmp_path, clock, store=store)
    restarted.recover()
    status = restarted.get_task(task_id).privacy
    assert status is not None and status.rounds_accounted == 1
    assert status.epsilon == pytest.approx(whole_population_epsilon(1))


def test_async_local_dp_runs_with_device_metrics_withheld(service: CoordinatorService) -> None:
    local = PrivacySpec(mode=PrivacyMode.LOCAL, local=LocalDp(
        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, max_epsilon=10.0))
    task_id = service.create_task(async_spec(privacy=local)).record.task_id
    plan = service.get_plan(seat(service, task_id, "a"))
    assert plan.privacy is not None and plan.privacy.local is not None
    assert plan.metrics is MetricsPolicy.WITHHELD


@pytest.mark.parametrize("kind", [k for k in RobustKind if k is not RobustKind.MEAN])
def test_async_with_a_robust_rule_other_than_the_mean_is_refused_at_launch(
        service: CoordinatorService, kind: RobustKind) -> None:
    aggregation = Aggregation(mode=AggregationMode.ASYNC, robust=RobustAggregation(kind=kind))
    with pytest.raises(InvalidRequest, match=f"spec.aggregation.mode: 'async' cannot run "
                                             f"with aggregation.robust.kind '{kind.value}'"):
        service.create_task(spec(aggregation=aggregation))
