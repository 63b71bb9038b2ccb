"""Rounds whose uploads go to aggregator shards, on the coordinator's side: assignment at
selection, signed tickets in the plans, the shards' accepted uploads as the round's reports,
one release from the combined partial sums, and a shard that dies losing only its group.

The shards here are an in-memory :class:`ShardPool` that folds uploads with numpy as the
ticket says (the shard process itself is tested in tests/unit/shards and, with this side,
in tests/integration/test_aggregator_shards.py)."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.service import CoordinatorService
from coordinator.rounds.shards import ShardUnavailable
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.privacy import NoiseSource, Sampling
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.protocol import CheckInOutcome, Participation, Plan, UpdateHeader
from core.shards import (
    KEY_BYTES,
    PartialSum,
    RoundKey,
    ShardMode,
    SignedTicket,
    UploadTicket,
    sign_ticket,
    verify_ticket,
)
from core.tensors import load_safetensors, sha256_hex
from core.types import (
    Aggregation,
    DeviceAttributes,
    ModelSpec,
    RobustAggregation,
    RobustKind,
    Robustness,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskSpec,
)

ATTRS = DeviceAttributes()
KEY = b"k" * KEY_BYTES
MODEL = ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3})


class FoldingShards:
    """Shards in memory: each verifies a ticket and folds the update as its mode says."""

    def __init__(self, n: int) -> None:
        self.addresses = tuple(f"shard-{i}:700{i}" for i in range(n))
        self.dead: set[int] = set()
        self.unhealthy: set[int] = set()
        self.parts: dict[tuple[RoundKey, int], PartialSum] = {}
        self.forgotten: list[RoundKey] = []
        #: Devices accepted since the coordinator's last poll (not yet in reported()).
        self.unpolled: set[str] = set()
        self.remembered: dict[tuple[RoundKey, int], set[str]] = {}

    def sign(self, ticket: UploadTicket) -> SignedTicket:
        return sign_ticket(ticket, KEY)

    def healthy(self) -> list[int]:
        return [i for i in range(len(self.addresses)) if i not in self.unhealthy]

    def watch(self, key: RoundKey) -> None:
        pass

    def reported(self, key: RoundKey) -> Mapping[int, frozenset[str]]:
        seen = {shard: set(devices) for (k, shard), devices in self.remembered.items()
                if k == key}
        for (k, shard), p in self.parts.items():
            if k == key:
                seen.setdefault(shard, set()).update(set(p.reported) - self.unpolled)
        return {shard: frozenset(devices) for shard, devices in seen.items()}

    def restart(self, shard: int) -> None:
        """The shard starts again: its rounds in memory are gone (as the gRPC pool does, the
        coordinator keeps what its last poll saw the shard accept)."""
        for k in [k for k in self.parts if k[1] == shard]:
            self.remembered[k] = set(self.parts.pop(k).reported)

    def collect(self, key: RoundKey, shard: int, size: int) -> PartialSum | None:
        self.unpolled.clear()
        if shard in self.dead:
            raise ShardUnavailable("UNAVAILABLE: connection refused")
        return self.parts.get((key, shard))

    def forget(self, key: RoundKey) -> None:
        self.forgotten.append(key)

    def close(self) -> None:
        pass

    def upload(self, plan: Plan, update: np.ndarray, num_examples: int,
               metrics: Mapping[str, float]) -> None:
        assert plan.shard_upload is not None
        t = verify_ticket(plan.shard_upload.ticket, KEY)
        assert plan.shard_upload.address == self.addresses[t.shard]
        part = self.parts.setdefault((t.round_key, t.shard), PartialSum(
            t.mode, np.zeros(t.values), []))
        flat = update.astype(np.float64).reshape(-1)
        if t.mode is ShardMode.FEDAVG:
            w = float(min(num_examples, t.weight_cap))
            part.total += w * flat
            part.weight += w
            for name, value in metrics.items():
                part.metric_sums[name] = part.metric_sums.get(name, 0.0) + w * value
                part.metric_weights[name] = part.metric_weights.get(name, 0.0) + w
        else:
            norm = float(np.linalg.norm(flat))
            part.total += flat * min(1.0, t.clip_norm / norm)
            part.weight += 1
        part.reported.append(t.device_id)


def spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="sharded", model=MODEL, rounds=2, clients_per_round=4, min_reports=3,
        over_selection=1.0, round_deadline_s=30.0, selection_window_s=1.0)
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def shards() -> FoldingShards:
    return FoldingShards(2)


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path, shards: FoldingShards) -> CoordinatorService:
    return CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(3), noise=NoiseSource.seeded(3),
                              settings=CoordinatorSettings(allow_seeded_noise=True,
                                                           checkin_pace_per_s=0),
                              shards=shards)


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


#: The update's layout: the model's tensors in this order (the plans' update_tensors).
ORDER = ("linear.weight", "linear.bias")


def model(service: CoordinatorService, task_id: str) -> np.ndarray:
    """The current model's parameters, flat in the update's layout."""
    rec = service.model_version(task_id, None)
    params = load_safetensors(b"".join(service.model_chunks(rec, 1 << 20)))
    assert set(params) == set(ORDER)
    return np.concatenate([params[name].reshape(-1) for name in ORDER])


def test_a_sharded_tasks_seats_are_spread_over_the_shards_with_signed_tickets(
        service: CoordinatorService, clock: ManualClock) -> None:
    task_id = service.create_task(spec()).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    plans = {d: service.get_plan(p) for d, p in seats.items()}
    assert tuple(t.name for t in plans["a"].update_tensors) == ORDER
    tickets = {}
    for d, plan in plans.items():
        assert plan.shard_upload is not None
        tickets[d] = verify_ticket(plan.shard_upload.ticket, KEY)
        assert tickets[d].device_id == d and tickets[d].task_id == task_id
        assert tickets[d].mode is ShardMode.FEDAVG and tickets[d].clear_metrics
        assert tickets[d].deadline == plan.deadline
    assert sorted(t.shard for t in tickets.values()) == [0, 0, 1, 1]
    # The plan is asked again (a retry): the same ticket.
    assert service.get_plan(seats["a"]).shard_upload == plans["a"].shard_upload


def test_an_upload_sent_to_the_coordinator_instead_of_its_shard_is_refused(
        service: CoordinatorService, clock: ManualClock) -> None:
    task_id = service.create_task(spec()).record.task_id
    p = next(iter(admit(service, clock, task_id, ["a", "b", "c"]).values()))
    plan = service.get_plan(p)
    payload = np.zeros(15, dtype="<f4").tobytes()
    with pytest.raises(InvalidRequest, match="go to aggregator shard shard-.* not here"):
        service.begin_upload(UpdateHeader(p, 5, list(plan.update_tensors), len(payload),
                                          sha256_hex(payload), {}))


def test_a_sharded_round_commits_the_weighted_mean_of_every_shards_updates(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    task_id = service.create_task(spec(robustness=Robustness(weight_cap=50))).record.task_id
    before = model(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    examples = {"a": 10, "b": 20, "c": 30, "d": 500}  # d's weight is capped at 50
    rng = np.random.default_rng(0)
    updates = {d: rng.normal(size=before.size).astype(np.float32) for d in seats}
    for d, p in seats.items():
        shards.upload(service.get_plan(p), updates[d], examples[d], {"train_loss": 1.0})
    service.tick()
    rounds = service.list_rounds(task_id)
    assert rounds[0].state is RoundState.COMMITTED
    weights = {d: min(n, 50) for d, n in examples.items()}
    expected = sum(weights[d] * updates[d].astype(np.float64) for d in seats) / 110
    np.testing.assert_allclose(model(service, task_id) - before, expected, atol=1e-5)
    metrics = rounds[0].metrics
    assert metrics["reports"] == 4 and metrics["shards"] == 2 and metrics["shards_lost"] == 0
    assert metrics["examples"] == 110 and metrics["train_loss"] == pytest.approx(1.0)


def test_a_dead_shard_loses_only_its_group_when_min_reports_remain(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    task_id = service.create_task(spec(clients_per_round=6, min_reports=3)).record.task_id
    before = model(service, task_id)
    seats = admit(service, clock, task_id, [f"d{i}" for i in range(6)])
    plans = {d: service.get_plan(p) for d, p in seats.items()}
    for d, plan in plans.items():
        shards.upload(plan, np.full(before.size, 1.0 if d in ("d0", "d2", "d4") else 9.0,
                                    dtype=np.float32), 10, {})
    assert {verify_ticket(plans[d].shard_upload.ticket, KEY).shard  # type: ignore[union-attr]
            for d in ("d1", "d3", "d5")} == {1}
    shards.dead.add(1)  # shard 1 dies after taking its three uploads
    service.tick()
    rnd = service.list_rounds(task_id)[0]
    assert rnd.state is RoundState.COMMITTED
    assert rnd.metrics["reports"] == 3 and rnd.metrics["shards_lost"] == 1
    np.testing.assert_allclose(model(service, task_id) - before, 1.0, atol=1e-6)


def test_a_round_fails_and_is_redone_when_a_dead_shard_leaves_too_few_reports(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    task_id = service.create_task(spec(clients_per_round=4, min_reports=3)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    for p in seats.values():
        shards.upload(service.get_plan(p), np.zeros(15, dtype=np.float32), 10, {})
    shards.dead.add(0)
    service.tick()
    first, second = service.list_rounds(task_id)
    assert first.state is RoundState.FAILED
    assert first.failure_reason is not None
    assert "2 updates reached the coordinator from 1 shards, under min_reports 3" in (
        first.failure_reason)
    assert "shard 0 (shard-0:7000): UNAVAILABLE: connection refused" in first.failure_reason
    assert second.round_number == first.round_number and second.state is RoundState.SELECTING
    assert RoundKey(task_id, first.round_id) in shards.forgotten


def test_a_shard_that_does_not_answer_is_assigned_no_new_device(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    shards.unhealthy.add(0)
    task_id = service.create_task(spec()).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    assert {verify_ticket(service.get_plan(p).shard_upload.ticket, KEY).shard  # type: ignore[union-attr]
            for p in seats.values()} == {1}


def test_a_central_dp_round_is_clipped_at_the_shards_and_noised_once(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    privacy = PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=0.01, delta=1e-5,
                          clip=FixedClip(0.5), sampling=Sampling.FIXED_SIZE, population=100,
                          max_epsilon=1e9)
    big = ModelSpec("logistic_regression", {"input_dim": 200, "num_classes": 10})  # 2,010
    task_id = service.create_task(spec(model=big, privacy=privacy, min_reports=2)
                                  ).record.task_id
    before = model(service, task_id)
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    for p in seats.values():
        plan = service.get_plan(p)
        t = verify_ticket(plan.shard_upload.ticket, KEY)  # type: ignore[union-attr]
        assert t.mode is ShardMode.CLIPPED_SUM and t.clip_norm == 0.5
        assert not t.clear_metrics
        shards.upload(plan, np.full(before.size, 10.0, dtype=np.float32), 10, {})
    service.tick()
    rnd = service.list_rounds(task_id)[0]
    assert rnd.state is RoundState.COMMITTED
    assert "examples" not in rnd.metrics and rnd.metrics["dp_epsilon"] > 0
    # Each update clipped to 0.5 (L2), summed over the 4 drawn, divided by the target 4;
    # then Gaussian noise of std z x C / 4 = 0.00125 per coordinate, added once (twice
    # would be 0.00177: the bounds below tell them apart over 2,010 coordinates).
    deviation = model(service, task_id) - before - 0.5 / np.sqrt(before.size)
    assert abs(float(deviation.mean())) < 4 * 0.00125 / np.sqrt(before.size)
    assert 0.9 * 0.00125 < float(deviation.std()) < 1.1 * 0.00125


@pytest.mark.parametrize("unsharded", [
    {"aggregation": Aggregation(robust=RobustAggregation(kind=RobustKind.MEDIAN))},
    {"secure_aggregation": SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6,
                                             dropout=0.001, clip=0.5, phase_timeout_s=5.0)},
])
def test_tasks_whose_uploads_need_the_coordinator_are_not_sharded(
        service: CoordinatorService, clock: ManualClock, unsharded: dict[str, object]) -> None:
    task_id = service.create_task(spec(clients_per_round=5, min_reports=5,
                                       **unsharded)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c", "d", "e"])
    assert seats
    assert all(service.get_plan(p).shard_upload is None for p in seats.values())


def test_a_restarted_shard_that_forgot_the_round_loses_its_group(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    task_id = service.create_task(spec(clients_per_round=6, min_reports=3)).record.task_id
    seats = admit(service, clock, task_id, [f"d{i}" for i in range(6)])
    plans = {d: service.get_plan(p) for d, p in seats.items()}
    on_1 = [d for d, plan in plans.items()
            if verify_ticket(plan.shard_upload.ticket, KEY).shard == 1]  # type: ignore[union-attr]
    for d in on_1:  # shard 1 takes its three uploads, then restarts and forgets them
        shards.upload(plans[d], np.ones(15, dtype=np.float32), 10, {})
    service.tick()
    shards.restart(1)
    for d, plan in plans.items():
        if d not in on_1:
            shards.upload(plan, np.ones(15, dtype=np.float32), 10, {})
    service.tick()
    rnd = service.list_rounds(task_id)[0]
    assert rnd.state is RoundState.COMMITTED
    assert rnd.metrics["shards"] == 1 and rnd.metrics["shards_lost"] == 1
    assert rnd.metrics["reports"] == 3


def test_updates_a_shard_took_after_the_last_poll_count_as_reports(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    task_id = service.create_task(spec(clients_per_round=4, min_reports=3,
                                       round_deadline_s=30)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    plans = {d: service.get_plan(p) for d, p in seats.items()}
    for d in ("a", "b", "c"):
        shards.upload(plans[d], np.ones(15, dtype=np.float32), 10, {})
    service.tick()
    shards.upload(plans["d"], np.ones(15, dtype=np.float32), 10, {})
    shards.unpolled.add("d")  # taken after the coordinator's last poll
    clock.advance(31)  # the deadline: three reports known, min_reports met
    service.tick()
    rnd = service.list_rounds(task_id)[0]
    assert rnd.state is RoundState.COMMITTED
    assert rnd.metrics["reports"] == 4 and rnd.reports == 4  # "d" recorded as it counted


def test_a_clipped_sum_longer_than_clipping_allows_loses_its_group(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    privacy = PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=0.01, delta=1e-5,
                          clip=FixedClip(0.5), sampling=Sampling.FIXED_SIZE, population=100,
                          max_epsilon=1e9)
    task_id = service.create_task(spec(privacy=privacy, min_reports=2)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    for p in seats.values():
        shards.upload(service.get_plan(p), np.full(15, 10.0, dtype=np.float32), 10, {})
    for (_, shard), part in shards.parts.items():
        if shard == 1:
            part.total *= 100  # a shard that did not clip
    service.tick()
    rnd = service.list_rounds(task_id)[0]
    assert rnd.state is RoundState.COMMITTED
    assert rnd.metrics["shards_lost"] == 1 and rnd.metrics["shards"] == 1


def test_a_seat_whose_shard_stopped_answering_is_given_another_with_its_plan(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    task_id = service.create_task(spec()).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c", "d"])
    shards.unhealthy.add(0)  # after the seats were assigned, before their plans
    assert {verify_ticket(service.get_plan(p).shard_upload.ticket, KEY).shard  # type: ignore[union-attr]
            for p in seats.values()} == {1}


def test_a_shard_restarted_mid_round_loses_its_group_even_after_new_uploads(
        service: CoordinatorService, clock: ManualClock, shards: FoldingShards) -> None:
    """What the coordinator saw a shard accept is kept across its polls: a shard that
    restarted, forgot two updates and then took a third cannot pass off the third alone."""
    task_id = service.create_task(spec(clients_per_round=6, min_reports=3)).record.task_id
    seats = admit(service, clock, task_id, [f"d{i}" for i in range(6)])
    plans = {d: service.get_plan(p) for d, p in seats.items()}
    on_1 = [d for d, plan in plans.items()
            if verify_ticket(plan.shard_upload.ticket, KEY).shard == 1]  # type: ignore[union-attr]
    for d in on_1[:2]:
        shards.upload(plans[d], np.ones(15, dtype=np.float32), 10, {})
    service.tick()  # the coordinator sees them
    shards.restart(1)
    shards.upload(plans[on_1[2]], np.ones(15, dtype=np.float32), 10, {})
    for d, plan in plans.items():
        if d not in on_1:
            shards.upload(plan, np.ones(15, dtype=np.float32), 10, {})
    service.tick()
    rnd = service.list_rounds(task_id)[0]
    assert rnd.state is RoundState.COMMITTED
    assert rnd.metrics["shards"] == 1 and rnd.metrics["shards_lost"] == 1
    assert rnd.metrics["reports"] == 3
