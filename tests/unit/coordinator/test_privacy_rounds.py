"""Central differential privacy in the coordinator's rounds (DP-FedAvg), driven with a manual
clock: the noise on the committed mean has std z C / clients_per_round (a fixed denominator),
updates are clipped on the device and again on the coordinator, epsilon is stored with every
round, the budget ends the task before a round that would exceed it, and seeded noise is
refused outside tests."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core import models
from core.data.dataset import LocalDataset
from core.models import register_model
from core.privacy import NoiseSource, Sampling, calibrate_noise, epsilon
from core.privacy.clipping import l2_norm
from core.privacy.distributed import device_noise_share_simulated
from core.privacy.errors import InsecureNoiseError
from core.privacy.spec import AdaptiveClip, FixedClip, LocalDp, PrivacyMode, PrivacySpec
from core.protocol import (
    UNCLIPPED_METRIC,
    CheckInOutcome,
    CheckInResult,
    Participation,
    Plan,
    UpdateHeader,
    config_hash,
)
from core.secagg.client import SecAggClient
from core.secagg.encoding import add_noise_share, encode_update
from core.secagg.messages import MaskedInputRequest, ShareKeysRequest, Stage, UnmaskRequest
from core.security.identity import DeviceKey
from core.taskspec import TaskSpecError, parse_task_yaml
from core.tensors import from_raw_bytes, load_safetensors, sha256_hex
from core.types import (
    DataSchema,
    DeviceAttributes,
    LocalTraining,
    ModelSpec,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskSpec,
    TaskState,
)
from device_agent.runtime.device import Device

ATTRS = DeviceAttributes()
#: 2,010 parameters: enough coordinates to measure the noise's standard deviation.
BIG = ModelSpec("logistic_regression", {"input_dim": 200, "num_classes": 10})


def central(**kw: object) -> PrivacySpec:
    base: dict[str, object] = dict(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5,
                                   clip=FixedClip(0.5), sampling=Sampling.FIXED_SIZE,
                                   population=100, max_epsilon=1000.0)
    base.update(kw)
    return PrivacySpec(**base)  # type: ignore[arg-type]


def spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="dp", model=BIG, rounds=3, clients_per_round=4, min_reports=2, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0, privacy=central(),
    )
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


def make_service(tmp_path: Path, clock: ManualClock, seed: int = 0, *,
                 store: InMemoryStore | None = None) -> CoordinatorService:
    return CoordinatorService(store if store is not None else InMemoryStore(),
                              FileBlobStore(tmp_path / f"blobs{seed}"), clock,
                              rng=random.Random(seed), noise=NoiseSource.seeded(seed),
                              settings=CoordinatorSettings(allow_seeded_noise=True))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return make_service(tmp_path, clock)


def admit(service: CoordinatorService, clock: ManualClock, task_id: str, devices: list[str]
          ) -> dict[str, Participation]:
    """``devices`` check in during the window, with as many others as make up the task's DP
    population (the accountant's q is what selection saw); the seats of those drawn."""
    privacy = service.get_task(task_id).spec.privacy
    fill = (privacy.population or 0) - len(devices) if privacy is not None else 0
    devices = devices + [f"other{i}" for i in range(max(fill, 0))]
    for d in devices:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    seats = {}
    for d in devices:
        r = service.check_in(d, ATTRS, task_id)
        if r.outcome is CheckInOutcome.ACCEPTED:
            seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def upload(service: CoordinatorService, p: Participation, flat: np.ndarray,
           metrics: dict[str, float] | None = None) -> None:
    plan = service.get_plan(p)
    payload = flat.astype("<f4").tobytes()
    header = UpdateHeader(p, 10, list(plan.update_tensors), len(payload), sha256_hex(payload),
                          metrics or {})
    up = service.begin_upload(header)
    up.write(payload)
    service.finish_upload(up)


def flat_params(service: CoordinatorService, task_id: str) -> np.ndarray:
    rec = service.model_version(task_id, None)
    params = load_safetensors(b"".join(service.model_chunks(rec, 1 << 20)))
    return np.concatenate([params[k].ravel() for k in sorted(params)]).astype(np.float64)


def size_of(service: CoordinatorService, p: Participation) -> int:
    return sum(t.numel for t in service.get_plan(p).update_tensors)


def run_round(service: CoordinatorService, clock: ManualClock, task_id: str,
              devices: list[str], update: float = 0.0) -> None:
    seats = admit(service, clock, task_id, devices)
    for p in seats.values():
        upload(service, p, np.full(size_of(service, p), update, np.float32))


# ---------------------------------------------------------------- the mechanism


def test_the_noise_on_the_mean_has_std_z_c_over_the_fixed_denominator(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(privacy=central(noise_multiplier=2.0, clip=FixedClip(0.5))))
    tid = task.record.task_id
    before = flat_params(service, tid)
    seats = admit(service, clock, tid, ["d0", "d1", "d2", "d3"])
    for p in list(seats.values())[:2]:  # only 2 of the 4 expected reports arrive
        upload(service, p, np.zeros(size_of(service, p), np.float32))
    clock.advance(30)
    service.tick()
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED and rnd.metrics["reports"] == 2
    moved = flat_params(service, tid) - before
    # sum of zero updates + N(0, (zC)^2), divided by clients_per_round (4), not by 2.
    assert np.std(moved) == pytest.approx(2.0 * 0.5 / 4, rel=0.08)
    assert abs(np.mean(moved)) < 0.02


def test_updates_are_summed_unweighted_and_divided_by_the_expected_reports(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(privacy=central(noise_multiplier=1e-8, clip=FixedClip(100.0), max_epsilon=1e300)))
    tid = task.record.task_id
    before = flat_params(service, tid)
    seats = list(admit(service, clock, tid, ["d0", "d1", "d2", "d3"]).values())
    n = size_of(service, seats[0])
    upload(service, seats[0], np.full(n, 0.01, np.float32))
    upload(service, seats[1], np.full(n, 0.03, np.float32))
    upload(service, seats[2], np.full(n, 0.02, np.float32))
    clock.advance(30)
    service.tick()
    moved = flat_params(service, tid) - before
    np.testing.assert_allclose(moved, (0.01 + 0.03 + 0.02) / 4, atol=1e-5)


def test_the_coordinator_clips_an_update_the_device_did_not(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(privacy=central(noise_multiplier=1e-6, clip=FixedClip(0.5), max_epsilon=1e300)))
    tid = task.record.task_id
    before = flat_params(service, tid)
    seats = list(admit(service, clock, tid, ["d0", "d1", "d2", "d3"]).values())
    for p in seats:
        upload(service, p, np.full(size_of(service, p), 1.0, np.float32))  # norm ~44.8
    moved = flat_params(service, tid) - before
    assert l2_norm(moved) == pytest.approx(0.5, rel=1e-4)  # 4 x C / 4


def test_the_plan_tells_devices_the_clip_norm(service: CoordinatorService,
                                              clock: ManualClock) -> None:
    task = service.create_task(spec())
    p = next(iter(admit(service, clock, task.record.task_id, ["d0"]).values()))
    plan = service.get_plan(p)
    assert plan.privacy is not None and plan.privacy.l2_clip_norm == 0.5
    assert not plan.privacy.report_unclipped and plan.privacy.local is None


# ---------------------------------------------------------------- accounting and budget


def test_epsilon_is_stored_with_every_round_and_grows(service: CoordinatorService,
                                                      clock: ManualClock) -> None:
    task = service.create_task(spec(rounds=3))
    tid = task.record.task_id
    for _ in range(3):
        run_round(service, clock, tid, ["d0", "d1", "d2", "d3"])
    rounds = service.list_rounds(tid)
    assert [r.state for r in rounds] == [RoundState.COMMITTED] * 3
    eps = [r.metrics["dp_epsilon"] for r in rounds]
    assert eps[0] < eps[1] < eps[2]
    for steps, value in enumerate(eps, start=1):
        assert value == pytest.approx(epsilon(
            noise_multiplier=1.0, sampling_rate=4 / 100, steps=steps, delta=1e-5,
            sampling=Sampling.FIXED_SIZE, population=100))
    assert all(r.metrics["dp_noise_multiplier"] == 1.0 and r.metrics["dp_clip"] == 0.5
               for r in rounds)
    assert service.get_task(tid).record.state is TaskState.COMPLETED


def test_a_task_stops_exactly_before_the_round_that_would_exceed_its_budget(
    service: CoordinatorService, clock: ManualClock
) -> None:
    def eps(steps: int) -> float:
        return epsilon(noise_multiplier=1.0, sampling_rate=4 / 100, steps=steps, delta=1e-5,
                       sampling=Sampling.FIXED_SIZE, population=100)

    budget = (eps(3) + eps(4)) / 2  # three rounds fit, a fourth would not
    task = service.create_task(spec(rounds=10, privacy=central(max_epsilon=budget)))
    tid = task.record.task_id
    for _ in range(3):
        assert service.get_task(tid).record.state is TaskState.RUNNING
        run_round(service, clock, tid, ["d0", "d1", "d2", "d3"])
    view = service.get_task(tid)
    assert view.record.state is TaskState.BUDGET_EXHAUSTED
    assert view.record.state.is_final
    assert "budget" in view.record.reason
    assert view.current_round is None
    rounds = service.list_rounds(tid)
    assert len(rounds) == 3 and rounds[-1].metrics["dp_epsilon"] <= budget
    assert service.model_version(tid, None).version == 3
    r = service.check_in("d0", ATTRS, tid)
    assert r.outcome is CheckInOutcome.FINISHED and "budget_exhausted" in r.message


def test_a_budget_smaller_than_one_round_opens_no_round(service: CoordinatorService) -> None:
    task = service.create_task(spec(privacy=central(max_epsilon=1e-3)))
    assert task.record.state is TaskState.BUDGET_EXHAUSTED
    assert service.list_rounds(task.record.task_id) == []


def test_a_target_epsilon_is_met_with_the_calibrated_noise(service: CoordinatorService,
                                                           clock: ManualClock) -> None:
    privacy = central(noise_multiplier=None, target_epsilon=2.0)
    task = service.create_task(spec(rounds=3, privacy=privacy))
    tid = task.record.task_id
    for _ in range(3):
        run_round(service, clock, tid, ["d0", "d1", "d2", "d3"])
    rounds = service.list_rounds(tid)
    z = calibrate_noise(target_epsilon=2.0, sampling_rate=0.04, steps=3, delta=1e-5,
                        sampling=Sampling.FIXED_SIZE, population=100)
    assert [r.metrics["dp_noise_multiplier"] for r in rounds] == [z] * 3
    assert rounds[-1].metrics["dp_epsilon"] <= 2.0
    assert service.get_task(tid).record.state is TaskState.COMPLETED


def test_a_restarted_coordinator_continues_the_epsilon_history(
    clock: ManualClock, tmp_path: Path
) -> None:
    store = InMemoryStore()
    blobs = FileBlobStore(tmp_path / "blobs")
    kwargs = dict(rng=random.Random(0), noise=NoiseSource.seeded(0),
                  settings=CoordinatorSettings(allow_seeded_noise=True))
    first = CoordinatorService(store, blobs, clock, **kwargs)  # type: ignore[arg-type]
    tid = first.create_task(spec(rounds=2)).record.task_id
    run_round(first, clock, tid, ["d0", "d1", "d2", "d3"])
    second = CoordinatorService(store, blobs, clock, **kwargs)  # type: ignore[arg-type]
    second.recover()
    run_round(second, clock, tid, ["d0", "d1", "d2", "d3"])
    eps = [r.metrics["dp_epsilon"] for r in second.list_rounds(tid)
           if r.state is RoundState.COMMITTED]
    assert len(eps) == 2 and eps[1] > eps[0]


def test_the_empirical_selection_rate_is_the_accountants_sampling_rate(
    clock: ManualClock, tmp_path: Path
) -> None:
    """Every device checks in every round; the scheduler's uniform fixed-size admission must
    include each device with probability q = clients_per_round / population."""
    population, goal, rounds = 20, 4, 150
    service = make_service(tmp_path, clock, seed=5)
    task = service.create_task(spec(
        model=ModelSpec("logistic_regression", {"input_dim": 2, "num_classes": 2}),
        rounds=rounds, clients_per_round=goal, min_reports=goal,
        privacy=central(population=population)))
    tid = task.record.task_id
    devices = [f"d{i}" for i in range(population)]
    included = dict.fromkeys(devices, 0)
    for _ in range(rounds):
        seats = admit(service, clock, tid, devices)
        assert len(seats) == goal
        for d, p in seats.items():
            upload(service, p, np.zeros(size_of(service, p), np.float32))
            included[d] += 1
    committed = service.list_rounds(tid)
    assert len(committed) == rounds
    q = committed[0].metrics["dp_sampling_rate"]
    assert q == goal / population
    rates = np.array(list(included.values())) / rounds
    assert rates.mean() == pytest.approx(q)
    # Binomial(150, 0.2): std 0.033 per device; 4.5 std covers 20 devices comfortably.
    assert np.all(np.abs(rates - q) < 4.5 * np.sqrt(q * (1 - q) / rounds))


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_clipping_moves_the_clip_norm_from_the_devices_bits(
    service: CoordinatorService, clock: ManualClock
) -> None:
    clip = AdaptiveClip(target_quantile=0.5, initial_l2_clip_norm=1.0, learning_rate=0.2,
                        bit_noise_std=2.0)
    task = service.create_task(spec(privacy=central(clip=clip, noise_multiplier=1.0)))
    tid = task.record.task_id
    seats = admit(service, clock, tid, ["d0", "d1", "d2", "d3"])
    plan = service.get_plan(next(iter(seats.values())))
    assert plan.privacy is not None and plan.privacy.report_unclipped
    for p in seats.values():  # every update fitted: C should shrink
        upload(service, p, np.zeros(size_of(service, p), np.float32),
               {UNCLIPPED_METRIC: 1.0})
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED
    assert UNCLIPPED_METRIC not in rnd.metrics  # the raw bits are never stored
    fraction = rnd.metrics["dp_unclipped_fraction"]
    expected = 1.0 * np.exp(-0.2 * (fraction - 0.5))
    assert rnd.metrics["dp_next_clip"] == pytest.approx(expected)
    seats = admit(service, clock, tid, ["d0", "d1", "d2", "d3"])
    plan = service.get_plan(next(iter(seats.values())))
    assert plan.privacy is not None and plan.privacy.l2_clip_norm == pytest.approx(expected)


def test_adaptive_clipping_refuses_a_bit_that_is_not_a_bit(
    service: CoordinatorService, clock: ManualClock
) -> None:
    clip = AdaptiveClip(0.5, 1.0, 0.2, 2.0)
    task = service.create_task(spec(privacy=central(clip=clip)))
    p = next(iter(admit(service, clock, task.record.task_id, ["d0"]).values()))
    with pytest.raises(InvalidRequest, match="must be 0 or 1"):
        upload(service, p, np.zeros(size_of(service, p), np.float32), {UNCLIPPED_METRIC: 0.5})


# ---------------------------------------------------------------- with secure aggregation

SECURE = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001,
                           clip=0.5, phase_timeout_s=5.0)


def secure_round(service: CoordinatorService, clock: ManualClock, task_id: str,
                 updates: dict[str, np.ndarray], bits: dict[str, int] | None = None) -> None:
    seats = admit(service, clock, task_id, list(updates))
    plan = service.get_plan(next(iter(seats.values())))
    sa = plan.secure_aggregation
    assert sa is not None and sa.params.weight_cap == 1  # unweighted under DP
    clients = {d: SecAggClient(sa.params, sa.context, config_hash(plan)) for d in seats}
    for d, p in seats.items():
        service.secagg_advertise(p, clients[d].advertise())
    for d, p in seats.items():
        req = service.secagg_reply(p, Stage.ADVERTISE)
        assert isinstance(req, ShareKeysRequest)
        service.secagg_share_keys(p, clients[d].share_keys(req))
    for d, p in seats.items():
        req = service.secagg_reply(p, Stage.SHARE_KEYS)
        assert isinstance(req, MaskedInputRequest)
        values = updates.get(d, next(iter(updates.values()))).astype(np.float64)
        if bits is not None:
            values = np.append(values, bits.get(d, 0) * sa.params.clip)
        enc = encode_update(values, 50, sa.params, np.random.default_rng(1))
        service.secagg_masked_input(p, clients[d].mask(req, enc.vector), {}, enc.clipped)
    for d, p in seats.items():
        req = service.secagg_reply(p, Stage.MASKED_INPUT)
        assert isinstance(req, UnmaskRequest)
        service.secagg_unmask(p, clients[d].unmask(req))


def test_a_secure_dp_round_noises_the_unmasked_sum_with_a_fixed_denominator(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(
        clients_per_round=6, min_reports=4, secure_aggregation=SECURE,
        privacy=central(noise_multiplier=2.0, clip=FixedClip(0.5))))
    tid = task.record.task_id
    before = flat_params(service, tid)
    n = int(before.size)
    secure_round(service, clock, tid, {f"d{i}": np.full(n, 0.002, np.float32) for i in range(6)})
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    # The weight coordinate counts devices; under DP no example count is released.
    assert rnd.metrics["reports"] == 6 and "examples" not in rnd.metrics
    moved = flat_params(service, tid) - before
    assert np.mean(moved) == pytest.approx(0.002, abs=0.01)  # 6 x 0.002 / 6
    assert np.std(moved) == pytest.approx(2.0 * 0.5 / 6, rel=0.08)
    assert rnd.metrics["dp_epsilon"] > 0


def test_a_secure_dp_round_with_adaptive_clipping_sums_the_bits_masked(
    service: CoordinatorService, clock: ManualClock
) -> None:
    clip = AdaptiveClip(target_quantile=0.5, initial_l2_clip_norm=1.0, learning_rate=0.2,
                        bit_noise_std=1.0)
    task = service.create_task(spec(
        clients_per_round=6, min_reports=4, secure_aggregation=SECURE,
        privacy=central(noise_multiplier=1.0, clip=clip)))
    tid = task.record.task_id
    n = int(flat_params(service, tid).size)
    secure_round(service, clock, tid, {f"d{i}": np.zeros(n, np.float32) for i in range(6)},
                 bits={f"d{i}": int(i < 4) for i in range(6)})
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    # 4 of 6 fitted, plus N(0, 1) on the count, over the 6 expected reports.
    assert abs(rnd.metrics["dp_unclipped_fraction"] - 4 / 6) < 4 * 1.0 / 6


# ---------------------------------------------------------------- configuration


def test_a_seeded_noise_source_is_refused_outside_tests(clock: ManualClock,
                                                        tmp_path: Path) -> None:
    with pytest.raises(InsecureNoiseError, match="allow_seeded_noise"):
        CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path), clock,
                           noise=NoiseSource.seeded(1))
    CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path), clock,
                       noise=NoiseSource.secure())


TASK = """
name: dp
model: {architecture: logistic_regression, arguments: {input_dim: 4, num_classes: 3}}
rounds: 3
clients_per_round: 10
min_reports: 5
"""


@pytest.mark.parametrize("privacy, field, message", [
    ("{mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 0, population: 100}",
     "privacy.clip", "must be positive"),
    ("{mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0}",
     "privacy.population", "is required"),
    ("{mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0, population: 5, "
     "max_epsilon: 10.0}", "privacy.population", "below the cohort of 13"),
    ("{mode: distributed, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0, population: 50, "
     "max_epsilon: 10.0}", "privacy.mode", "needs secure_aggregation"),
    ("{mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 1.0, population: 50}",
     "privacy.max_epsilon", "is required with noise_multiplier"),
    ("{mode: centrall}", "privacy.mode", "expected one of"),
])
def test_privacy_errors_name_the_file_and_field(privacy: str, field: str, message: str) -> None:
    with pytest.raises(TaskSpecError, match=message) as info:
        parse_task_yaml(TASK + f"privacy: {privacy}\n", source="tasks/dp.yaml")
    assert info.value.field == field
    assert str(info.value).startswith(f"tasks/dp.yaml: field '{field}': ")


def test_privacy_survives_the_task_store(service: CoordinatorService) -> None:
    s = spec(privacy=central(max_epsilon=50.0, clip=AdaptiveClip(0.5, 1.0, 0.2, 2.0)))
    assert service.get_task(service.create_task(s).record.task_id).spec == s


def test_an_unreachable_target_epsilon_is_refused_at_creation(
    service: CoordinatorService
) -> None:
    with pytest.raises(InvalidRequest, match="spec.privacy"):
        service.create_task(spec(rounds=1, clients_per_round=4, privacy=central(
            noise_multiplier=None, target_epsilon=1e-9, population=4)))


@pytest.fixture
def batchnorm_model(monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    """A model with BatchNorm, registered for one test only."""
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register_model("test_batchnorm")
    def _batchnorm(input_dim: int, num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(input_dim, 8), nn.BatchNorm1d(8),
                             nn.Linear(8, num_classes))

    return ModelSpec("test_batchnorm", {"input_dim": 4, "num_classes": 3})


def test_local_dp_refuses_a_model_opacus_cannot_train(service: CoordinatorService,
                                                      batchnorm_model: ModelSpec) -> None:
    local = PrivacySpec(mode=PrivacyMode.LOCAL, local=LocalDp(1.0, 1.0, 1e-5, 10.0))
    with pytest.raises(InvalidRequest, match="GroupNorm") as info:
        service.create_task(spec(model=batchnorm_model, privacy=local))
    assert "BatchNorm" in str(info.value)
    ok = service.create_task(spec(privacy=local))
    assert ok.record.state is TaskState.RUNNING


def distributed_round(service: CoordinatorService, clock: ManualClock, task_id: str,
                      updates: dict[str, np.ndarray], reporting: int) -> None:
    """Devices as the agent runs them: clip (updates are within C here), encode with weight 1,
    add their integer noise share, mask. Only the first ``reporting`` upload."""
    seats = admit(service, clock, task_id, list(updates))
    plan = service.get_plan(next(iter(seats.values())))
    sa, privacy = plan.secure_aggregation, plan.privacy
    assert sa is not None and privacy is not None and privacy.distributed_noise_steps
    clients = {d: SecAggClient(sa.params, sa.context, config_hash(plan)) for d in seats}
    for d, p in seats.items():
        service.secagg_advertise(p, clients[d].advertise())
    for d, p in seats.items():
        req = service.secagg_reply(p, Stage.ADVERTISE)
        assert isinstance(req, ShareKeysRequest)
        service.secagg_share_keys(p, clients[d].share_keys(req))
    uploaded = list(seats)[:reporting]
    for index, d in enumerate(uploaded):
        req = service.secagg_reply(seats[d], Stage.SHARE_KEYS)
        assert isinstance(req, MaskedInputRequest)
        update = updates.get(d, next(iter(updates.values())))
        enc = encode_update(update, 50, sa.params, np.random.default_rng(1))
        # A seed per device, never shared: two equal shares would add up coherently
        # (hash(d) % 1000 collided for some hash seeds: std sqrt(8/6) of the planned).
        share = device_noise_share_simulated(
            len(enc.vector) - 1, noise_stddev=privacy.distributed_noise_steps,
            devices_planned=privacy.devices_planned, source=NoiseSource.seeded(index))
        service.secagg_masked_input(seats[d], clients[d].mask(req, add_noise_share(
            enc.vector, share)), {}, enc.clipped)
    if reporting < len(seats):
        clock.advance(5.1)  # the others never upload: the stage closes at its deadline
        service.tick()
    for d in uploaded:
        req = service.secagg_reply(seats[d], Stage.MASKED_INPUT)
        assert isinstance(req, UnmaskRequest)
        service.secagg_unmask(seats[d], clients[d].unmask(req))


def distributed(floor: float = 1.5) -> PrivacySpec:
    return central(mode=PrivacyMode.DISTRIBUTED, noise_multiplier=2.0, clip=FixedClip(0.5),
                   min_noise_multiplier=floor)


def test_distributed_dp_noise_comes_from_the_devices_and_reaches_the_planned_std(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(clients_per_round=6, min_reports=4,
                                    secure_aggregation=SECURE, privacy=distributed()))
    tid = task.record.task_id
    before = flat_params(service, tid)
    n = int(before.size)
    distributed_round(service, clock, tid,
                      {f"d{i}": np.full(n, 0.002, np.float32) for i in range(6)}, reporting=6)
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    moved = flat_params(service, tid) - before
    assert np.mean(moved) == pytest.approx(0.002, abs=0.01)
    assert np.std(moved) == pytest.approx(2.0 * 0.5 / 6, rel=0.08)  # z C / clients_per_round
    assert rnd.metrics["dp_noise_multiplier"] == pytest.approx(2.0)


def test_distributed_dp_epsilon_reflects_the_noise_of_the_devices_that_reported(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(clients_per_round=6, min_reports=4,
                                    secure_aggregation=SECURE, privacy=distributed()))
    tid = task.record.task_id
    n = int(flat_params(service, tid).size)
    distributed_round(service, clock, tid,
                      {f"d{i}": np.zeros(n, np.float32) for i in range(6)}, reporting=5)
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    received = 2.0 * (5 / 6) ** 0.5  # five of six shares arrived
    assert rnd.metrics["dp_noise_multiplier"] == pytest.approx(received)
    assert rnd.metrics["dp_epsilon"] == pytest.approx(epsilon(
        noise_multiplier=received, sampling_rate=6 / 100, steps=1, delta=1e-5,
        sampling=Sampling.FIXED_SIZE, population=100))
    assert rnd.metrics["dp_epsilon"] > epsilon(
        noise_multiplier=2.0, sampling_rate=6 / 100, steps=1, delta=1e-5,
        sampling=Sampling.FIXED_SIZE, population=100)


def test_distributed_dp_below_the_noise_floor_aborts_and_releases_nothing(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec(clients_per_round=6, min_reports=3,
                                    secure_aggregation=SECURE, privacy=distributed(floor=1.8)))
    tid = task.record.task_id
    n = int(flat_params(service, tid).size)
    # Four of six shares carry z = 2 sqrt(4/6) = 1.63 < 1.8: secure aggregation succeeds, the
    # privacy gate refuses the release.
    distributed_round(service, clock, tid,
                      {f"d{i}": np.zeros(n, np.float32) for i in range(6)}, reporting=4)
    rnd = service.list_rounds(tid)[0]
    assert rnd.state is RoundState.FAILED
    assert "below the floor" in (rnd.failure_reason or "")
    assert service.model_version(tid, None).version == 0


def test_distributed_dp_needs_a_fixed_clip(service: CoordinatorService) -> None:
    adaptive = AdaptiveClip(target_quantile=0.5, initial_l2_clip_norm=0.5, learning_rate=0.2,
                            bit_noise_std=4.0)
    with pytest.raises(InvalidRequest, match="fixed clip"):
        service.create_task(spec(clients_per_round=6, min_reports=4, secure_aggregation=SECURE,
                                 privacy=dataclasses.replace(distributed(), clip=adaptive)))


# ---------------------------------------------------------------- the device side


class OneRound:
    """A coordinator for one device and one round: the plan and model of a real service's
    seat, then "finished"; it records what the device uploads."""

    def __init__(self, service: CoordinatorService, p: Participation) -> None:
        self.plan = service.get_plan(p)
        rec = service.model_for_participant(p, self.plan.model_version)
        self.model = b"".join(service.model_chunks(rec, 1 << 20))
        self.p = p
        self.calls = 0
        self.uploads: list[tuple[UpdateHeader, bytes]] = []

    def enroll(self, key: DeviceKey, enrollment_token: str = "",
               attestation: bytes = b"") -> str:
        return key.device_id

    def check_in(self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
                 schema: DataSchema | None = None, declined: Sequence[str] = ()
                 ) -> CheckInResult:
        self.calls += 1
        if self.calls > 1:
            return CheckInResult(CheckInOutcome.FINISHED, message="done")
        return CheckInResult(CheckInOutcome.ACCEPTED, self.p.task_id, self.p.round_number,
                             self.p.token)

    def get_plan(self, p: Participation) -> Plan:
        return self.plan

    def download_model(self, p: Participation, plan: Plan) -> bytes:
        return self.model

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int) -> str:
        self.uploads.append((header, payload))
        return "ok"

    def report_status(self, p: Participation, *, metrics: dict[str, float] | None = None,
                      error: str = "", decline: bool = False) -> None:
        raise AssertionError(f"the device reported an error: {error}")


class Recording(OneRound):
    """OneRound that also records the errors the device reports."""

    def __init__(self, service: CoordinatorService, p: Participation) -> None:
        super().__init__(service, p)
        self.errors: list[str] = []

    def report_status(self, p: Participation, *, metrics: dict[str, float] | None = None,
                      error: str = "", decline: bool = False) -> None:
        self.errors.append(error)


def test_a_local_dp_device_never_sends_an_update_past_its_budget(tmp_path: Path) -> None:
    clock = ManualClock()
    service = make_service(tmp_path, clock)
    small_budget = PrivacySpec(mode=PrivacyMode.LOCAL, local=LocalDp(1.0, 1.0, 1e-5, 0.5))
    task = service.create_task(spec(
        model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        local=LocalTraining(epochs=3, batch_size=8, learning_rate=0.5), privacy=small_budget))
    p = next(iter(admit(service, clock, task.record.task_id, ["d0"]).values()))
    coordinator = Recording(service, p)
    plan = coordinator.plan
    assert plan.privacy is not None and plan.privacy.local is not None
    assert plan.privacy.local.max_epsilon == 0.5
    stats = Device(DeviceKey.generate(), dataset(0), coordinator, task_id=p.task_id,
                   local_dp_secure_noise=False).run()
    assert coordinator.uploads == []  # trained, but nothing left the device
    assert len(coordinator.errors) == 1 and "past the task's budget 0.5" in coordinator.errors[0]
    assert "past the task's budget" in stats.finished_reason
    assert coordinator.calls == 1  # it stopped taking part in the task


def dataset(seed: int) -> LocalDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4)).astype(np.float32) * 5
    y = rng.integers(0, 3, 40)
    return LocalDataset(x_train=x, y_train=y, x_test=x[:5], y_test=y[:5], classes=3)


@pytest.mark.parametrize("clip_norm, adaptive, seed", [
    (0.05, False, 0), (0.3, True, 1), (2.0, False, 2), (1e-3, True, 3), (0.7, False, 4)])
def test_no_update_a_device_uploads_exceeds_the_clip_norm(
    tmp_path: Path, clip_norm: float, adaptive: bool, seed: int
) -> None:
    clock = ManualClock()
    service = make_service(tmp_path, clock)
    clip: FixedClip | AdaptiveClip = (
        AdaptiveClip(0.5, clip_norm, 0.2, 2.0) if adaptive else FixedClip(clip_norm))
    task = service.create_task(spec(
        model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        local=LocalTraining(epochs=3, batch_size=8, learning_rate=0.5),
        privacy=central(clip=clip)))
    p = next(iter(admit(service, clock, task.record.task_id, ["d0"]).values()))
    coordinator = OneRound(service, p)
    Device(DeviceKey.generate(), dataset(seed), coordinator, task_id=p.task_id).run()
    (header, payload), = coordinator.uploads
    norm = l2_norm(from_raw_bytes(payload, header.tensors))
    assert norm <= clip_norm
    if clip_norm <= 0.05:  # training moves the weights further: the update was clipped
        assert norm == pytest.approx(clip_norm, rel=1e-5)
        assert header.metrics.get(UNCLIPPED_METRIC, 0.0) == 0.0
    if adaptive:
        assert header.metrics[UNCLIPPED_METRIC] in (0.0, 1.0)
    else:
        assert UNCLIPPED_METRIC not in header.metrics


def test_local_dp_refuses_a_model_that_brings_its_own_loss(service: CoordinatorService,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    def squared(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (model(x) ** 2).mean()

    @register_model("test_own_loss", loss=squared)
    def _own_loss(input_dim: int, num_classes: int) -> nn.Module:
        return nn.Linear(input_dim, num_classes)

    local = PrivacySpec(mode=PrivacyMode.LOCAL, local=LocalDp(1.0, 1.0, 1e-5, 10.0))
    with pytest.raises(InvalidRequest, match="spec.privacy.mode: local DP-SGD trains with "
                                             "cross-entropy .* 'test_own_loss' would be ignored"):
        service.create_task(spec(model=ModelSpec("test_own_loss", {"input_dim": 4,
                                                                   "num_classes": 3}),
                                 privacy=local))
