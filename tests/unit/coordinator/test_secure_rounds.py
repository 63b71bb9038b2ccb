"""Rounds with secure aggregation, driven through the coordinator's service with a manual
clock: the committed model moves by the weighted mean of the updates (within quantization
error) although the coordinator only ever holds masked vectors; dropouts and deadlines at
every stage end the round cleanly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import Duplicate, InvalidRequest, Late
from coordinator.rounds.secure import Aborted
from coordinator.rounds.service import CoordinatorService
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, InMemoryStore
from core.protocol import CheckInOutcome, MetricsPolicy, Participation, config_hash
from core.secagg.client import SecAggClient
from core.secagg.encoding import encode_update, masked_metric_values
from core.secagg.messages import MaskedInputRequest, ShareKeysRequest, Stage, UnmaskRequest
from core.tensors import load_safetensors
from core.types import (
    DeviceAttributes,
    ModelSpec,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskSpec,
)

ATTRS = DeviceAttributes()
N = 6


def spec(**kw: object) -> TaskSpec:
    base: dict[str, object] = dict(
        name="secure",
        model=ModelSpec("logistic_regression", {"input_dim": 4, "num_classes": 3}),
        rounds=2, clients_per_round=N, min_reports=4, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0,
        secure_aggregation=SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6,
                                             dropout=0.001, clip=0.5, phase_timeout_s=5.0),
    )
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return CoordinatorService(InMemoryStore(), FileBlobStore(tmp_path / "blobs"), clock,
                              rng=random.Random(3), settings=CoordinatorSettings())


def admit(service: CoordinatorService, clock: ManualClock, task_id: str, count: int = N
          ) -> dict[str, Participation]:
    names = [f"d{i}" for i in range(count)]
    for d in names:
        service.check_in(d, ATTRS, task_id)
    clock.advance(1.1)
    seats = {}
    for d in names:
        r = service.check_in(d, ATTRS, task_id)
        assert r.outcome is CheckInOutcome.ACCEPTED
        seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def params_of(service: CoordinatorService, task_id: str) -> dict[str, np.ndarray]:
    rec = service.model_version(task_id, None)
    return load_safetensors(b"".join(service.model_chunks(rec, 1 << 20)))


class Devices:
    """Honest devices speaking to the service directly, stage by stage."""

    def __init__(self, service: CoordinatorService, seats: dict[str, Participation]) -> None:
        self.service = service
        self.seats = seats
        self.plan = service.get_plan(next(iter(seats.values())))
        sa = self.plan.secure_aggregation
        assert sa is not None
        self.clients = {d: SecAggClient(sa.params, sa.context, config_hash(self.plan))
                        for d in seats}
        size = sum(t.numel for t in self.plan.update_tensors)
        rng = np.random.default_rng(0)
        self.updates = {d: rng.uniform(-0.4, 0.4, size).astype(np.float32) for d in seats}
        self.examples = {d: 10 * (i + 1) for i, d in enumerate(seats)}

    def advertise(self, who: list[str]) -> None:
        for d in who:
            self.service.secagg_advertise(self.seats[d], self.clients[d].advertise())

    def reply(self, d: str, after: Stage) -> object | None:
        return self.service.secagg_reply(self.seats[d], after)

    def share(self, who: list[str]) -> None:
        for d in who:
            req = self.reply(d, Stage.ADVERTISE)
            assert isinstance(req, ShareKeysRequest)
            self.service.secagg_share_keys(self.seats[d], self.clients[d].share_keys(req))

    def mask(self, who: list[str]) -> None:
        sa = self.plan.secure_aggregation
        assert sa is not None
        for d in who:
            req = self.reply(d, Stage.SHARE_KEYS)
            assert isinstance(req, MaskedInputRequest)
            # The device's metrics ride inside the masked vector (MetricsPolicy.MASKED).
            assert self.plan.metrics is MetricsPolicy.MASKED
            values = np.append(self.updates[d].astype(np.float64), masked_metric_values(
                {"train_loss": 1.0 + self.examples[d] / 100}, sa.params.clip))
            enc = encode_update(values, self.examples[d], sa.params, np.random.default_rng(1))
            self.service.secagg_masked_input(self.seats[d], self.clients[d].mask(req, enc.vector),
                                             {}, enc.clipped)

    def unmask(self, who: list[str]) -> None:
        for d in who:
            req = self.reply(d, Stage.MASKED_INPUT)
            assert isinstance(req, UnmaskRequest)
            self.service.secagg_unmask(self.seats[d], self.clients[d].unmask(req))

    def expected_mean(self, who: list[str]) -> np.ndarray:
        w = np.array([self.examples[d] for d in who], dtype=np.float64)
        return sum(wi * self.updates[d] for wi, d in zip(w, who, strict=True)) / w.sum()


def test_a_secure_round_commits_the_weighted_mean_of_the_survivors(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec())
    tid = task.record.task_id
    before = params_of(service, tid)
    dev = Devices(service, admit(service, clock, tid))
    everyone = list(dev.seats)
    dev.advertise(everyone)
    dev.share(everyone)
    dev.mask(everyone[:-1])  # the last device vanishes after sharing its keys
    clock.advance(5.1)  # the masked-input stage closes at its deadline
    service.tick()
    dev.unmask(everyone[:-1])
    rounds = service.list_rounds(tid)
    assert rounds[0].state is RoundState.COMMITTED, rounds[0].failure_reason
    assert rounds[0].metrics["secagg_dropped"] == 1.0
    assert rounds[0].metrics["reports"] == float(N - 1)
    after = params_of(service, tid)
    moved = np.concatenate([(after[k] - before[k]).ravel() for k in ("linear.weight",
                                                                      "linear.bias")])
    expected = dev.expected_mean(everyone[:-1])
    assert np.max(np.abs(moved - expected)) <= rounds[0].metrics["secagg_max_error"] + 1e-6


def test_with_fewer_devices_than_the_goal_advertisement_closes_at_the_deadline(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec())
    tid = task.record.task_id
    dev = Devices(service, admit(service, clock, tid, count=N - 2))
    names = list(dev.seats)
    dev.advertise(names)
    assert dev.reply(names[0], Stage.ADVERTISE) is None  # more devices may still come
    clock.advance(30)
    service.tick()
    dev.share(names)
    dev.mask(names)
    dev.unmask(names)
    committed = service.list_rounds(tid)[0]
    assert committed.state is RoundState.COMMITTED, committed.failure_reason
    assert committed.metrics["reports"] == N - 2


def test_plaintext_uploads_are_refused_for_a_secure_task(
    service: CoordinatorService, clock: ManualClock
) -> None:
    from core.protocol import UpdateHeader

    task = service.create_task(spec())
    seats = admit(service, clock, task.record.task_id)
    p = next(iter(seats.values()))
    plan = service.get_plan(p)
    header = UpdateHeader(p, 10, list(plan.update_tensors), 60, "0" * 64, {})
    with pytest.raises(InvalidRequest, match="never in the clear"):
        service.begin_upload(header)


def test_replays_and_late_messages_get_clear_errors_and_the_round_goes_on(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec())
    tid = task.record.task_id
    dev = Devices(service, admit(service, clock, tid))
    everyone = list(dev.seats)
    dev.advertise(everyone[:-1])
    again = SecAggClient(dev.clients["d0"].params, b"x", config_hash(dev.plan)).advertise()
    with pytest.raises(Duplicate, match="already advertised"):
        service.secagg_advertise(dev.seats["d0"], again)
    # Another round's configuration (a stale advertisement): refused, that device alone.
    last = everyone[-1]
    stale = SecAggClient(dev.clients[last].params, b"x", b"h" * 32).advertise()
    with pytest.raises(InvalidRequest, match="not the hash of this round's plan"):
        service.secagg_advertise(dev.seats[last], stale)
    assert dev.reply("d0", Stage.ADVERTISE) is None  # still waiting for the last device
    dev.advertise(everyone[-1:])
    with pytest.raises(Late, match="too late"):
        service.secagg_advertise(dev.seats["d0"], again)
    dev.share(everyone)
    dev.mask(everyone)
    dev.unmask(everyone)
    assert service.list_rounds(tid)[0].state is RoundState.COMMITTED


def test_too_many_dropouts_abort_the_round_and_release_nothing(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec())
    tid = task.record.task_id
    dev = Devices(service, admit(service, clock, tid))
    everyone = list(dev.seats)
    dev.advertise(everyone)
    dev.share(everyone)
    dev.mask(everyone[:3])  # t = 4 of 6: three uploads cannot be unmasked
    clock.advance(5.1)
    service.tick()
    failed = service.list_rounds(tid)[0]
    assert failed.state is RoundState.FAILED
    assert "secure aggregation aborted" in (failed.failure_reason or "")
    assert service.model_version(tid, None).version == 0
    with pytest.raises(Late):
        dev.reply("d0", Stage.MASKED_INPUT)


def test_a_silent_stage_closes_at_its_deadline(
    service: CoordinatorService, clock: ManualClock
) -> None:
    task = service.create_task(spec())
    tid = task.record.task_id
    dev = Devices(service, admit(service, clock, tid))
    dev.advertise(list(dev.seats))
    clock.advance(5.1)  # nobody sends shares
    service.tick()
    failed = service.list_rounds(tid)[0]
    assert failed.state is RoundState.FAILED
    assert "shared keys" in (failed.failure_reason or "")


def test_a_task_whose_secure_aggregation_cannot_be_made_safe_is_refused(
    service: CoordinatorService,
) -> None:
    with pytest.raises(Exception, match="secure_aggregation"):
        service.create_task(spec(secure_aggregation=SecureAggregation(threshold=0.5)))


def test_aborted_is_reported_as_such() -> None:
    assert issubclass(Aborted, Late)
