"""Evaluation tasks in the coordinator's rounds, driven with a manual clock and real devices'
code (the TorchTrainer's evaluation, the Device's report path) over the service API: the
released results are the statistics of the devices' reports, exactly in the clear, within
the quantization bound under secure aggregation; central DP charges epsilon and stops the
task at its budget; bad reports and bad launches are refused with the field named."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import evaluation_rounds_support as support
import numpy as np
import pytest
import torch
from evaluation_rounds_support import MODEL, admit, bundle, make_service, upload
from torch import nn

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest, Late
from coordinator.rounds.evaluation_tasks import evaluation_setup
from coordinator.rounds.service import CoordinatorService
from coordinator.storage import InMemoryStore
from core import models
from core.data.dataset import LocalDataset
from core.evaluation import (
    DeviceResult,
    EvaluationLayout,
    capped_values,
    device_vector,
    read_plan,
    round_metrics,
    split_bundle,
    summarize,
)
from core.evaluation.summary import quantile_key
from core.privacy import Sampling
from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec
from core.privacy.task import EPSILON_METRIC, TaskPrivacy, planned_draw
from core.protocol import (
    CheckInOutcome,
    CheckInResult,
    MetricsPolicy,
    Participation,
    Plan,
    UpdateHeader,
)
from core.secagg.messages import (
    KeyAdvertisement,
    MaskedInputRequest,
    RingVector,
    ShareKeysRequest,
    ShareKeysResponse,
    UnmaskRequest,
    UnmaskResponse,
)
from core.security.identity import DeviceKey
from core.taskspec import TaskSpecError, validate_task_spec
from core.tensors import load_safetensors
from core.types import (
    DataSchema,
    DeviceAttributes,
    FederatedEvaluation,
    HistogramBins,
    MetricRange,
    ModelSpec,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskKind,
    TaskSpec,
    TaskState,
)
from device_agent.runtime.device import Device, TorchTrainer

N = 5
DEVICES = [f"d{i}" for i in range(N)]


def spec(**kw: object) -> TaskSpec:
    """An evaluation task; its reports carry sketches where they may (clear reports)."""
    clear = "secure_aggregation" not in kw and "privacy" not in kw
    base: dict[str, object] = dict(
        name="eval", kind=TaskKind.EVALUATE, model=MODEL, rounds=1, clients_per_round=N,
        min_reports=3, over_selection=1.0, round_deadline_s=30.0, selection_window_s=1.0,
        evaluate=FederatedEvaluation(histograms={"loss": HistogramBins(bins=20, high=4.0),
                                                 "accuracy": HistogramBins(bins=5)},
                                     max_examples=64, quantiles=(0.5,), sketch=clear))
    base.update(kw)
    return TaskSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return make_service(tmp_path, clock)


def dataset(seed: int) -> LocalDataset:
    rng = np.random.default_rng(seed)
    n = 10 + 7 * seed
    x = rng.normal(size=(n + 40, 4)).astype(np.float32) * 3
    y = rng.integers(0, 3, n + 40)
    return LocalDataset(x_train=x[n:], y_train=y[n:], x_test=x[:n], y_test=y[:n], classes=3)


def device_report(service: CoordinatorService, p: Participation, seed: int
                  ) -> tuple[EvaluationLayout, dict[int, DeviceResult]]:
    """What device ``seed`` evaluates, with the agent's own trainer."""
    plan, data = bundle(service, p)
    evaluation = read_plan(data)
    assert evaluation is not None
    versions = split_bundle(load_safetensors(data), evaluation)
    results = TorchTrainer(dataset(seed), p.device_id).evaluate_versions(plan, evaluation,
                                                                         versions)
    return EvaluationLayout(evaluation), results


def upload_report(service: CoordinatorService, p: Participation, report: np.ndarray) -> str:
    return upload(service, p, report.astype("<f4").tobytes())


class InProcess:
    """The Device's coordinator, answered by the service for one seat (clear uploads only;
    the Device's own id stands for the seat's)."""

    def __init__(self, service: CoordinatorService, seat: Participation) -> None:
        self.service, self.seat, self.errors = service, seat, list[str]()
        self.offered = False

    def _as_seat(self, p: Participation) -> Participation:
        return dataclasses.replace(p, device_id=self.seat.device_id)

    def enroll(self, key: DeviceKey, enrollment_token: str = "", attestation: bytes = b""
               ) -> str:
        return key.device_id

    def check_in(self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
                 schema: DataSchema | None = None, declined: Sequence[str] = ()
                 ) -> CheckInResult:
        if self.offered:
            return CheckInResult(CheckInOutcome.FINISHED, message="done")
        self.offered = True
        s = self.seat
        return CheckInResult(CheckInOutcome.ACCEPTED, s.task_id, s.round_number, s.token)

    def get_plan(self, p: Participation) -> Plan:
        return self.service.get_plan(self._as_seat(p))

    def download_model(self, p: Participation, plan: Plan) -> bytes:
        return bundle(self.service, self._as_seat(p))[1]

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int) -> str:
        up = self.service.begin_upload(dataclasses.replace(
            header, participation=self._as_seat(header.participation)))
        up.write(payload)
        return self.service.finish_upload(up)

    def report_status(self, p: Participation, *, metrics: dict[str, float] | None = None,
                      error: str = "", decline: bool = False) -> None:
        self.errors.append(error)

    def secagg_advertise(self, p: Participation, message: KeyAdvertisement, *,
                         wait_s: float) -> ShareKeysRequest:
        raise AssertionError("clear uploads only")

    def secagg_share_keys(self, p: Participation, message: ShareKeysResponse, *,
                          wait_s: float) -> MaskedInputRequest:
        raise AssertionError("clear uploads only")

    def secagg_masked_input(self, p: Participation, vector: RingVector,
                            metrics: Mapping[str, float], clipped: int, *,
                            wait_s: float) -> UnmaskRequest:
        raise AssertionError("clear uploads only")

    def secagg_unmask(self, p: Participation, message: UnmaskResponse, *,
                      wait_s: float) -> None:
        raise AssertionError("clear uploads only")


def plaintext(layout: EvaluationLayout, results: Mapping[str, dict[int, DeviceResult]],
              quantiles: tuple[float, ...] = (0.5,)) -> dict[str, float]:
    """The released statistics of the sums (those of the sketches aside: their merge
    flips coins; :func:`assert_example_quantiles` checks them)."""
    sums = np.sum([device_vector(layout, r) for r in results.values()], axis=0)
    sums[layout.sketch_mask] = 0.0
    return round_metrics(summarize(layout, sums, quantiles))


def assert_example_quantiles(layout: EvaluationLayout, released: Mapping[str, float],
                             results: Mapping[str, dict[int, DeviceResult]],
                             quantiles: Sequence[float]) -> None:
    """Each released ``example_q<p>`` has a true rank among the devices' pooled per-example
    values (clamped, capped at max_examples) within ``example_rank_error`` of q."""
    plan = layout.plan
    for m in layout.sketched:
        for version in plan.versions:
            pooled = np.sort(np.concatenate([
                np.clip(capped_values(r[version].per_example[m.name],
                                      min(r[version].examples, plan.max_examples)),
                        m.low, m.high).astype(np.float32) for r in results.values()]))
            base = f"eval.v{version}.{m.name}"
            bound = released[f"{base}.example_rank_error"]
            for q in quantiles:
                value = released[f"{base}.example_{quantile_key(q)}"]
                low = np.searchsorted(pooled, value, side="left") / pooled.size
                high = np.searchsorted(pooled, value, side="right") / pooled.size
                assert low - bound <= q <= high + bound, (base, q, value, low, high, bound)


def test_an_evaluation_round_releases_the_statistics_of_the_devices_reports(
        service: CoordinatorService, clock: ManualClock) -> None:
    task = service.create_task(spec())
    tid = task.record.task_id
    assert any("evaluates model version(s) 0 of its own initial model" in line
               for line in task.launch_checks)
    seats = admit(service, clock, tid, DEVICES)
    plan = service.get_plan(seats["d0"])
    assert plan.metrics is MetricsPolicy.CLEAR and plan.update_tensors[0].name == \
        "evaluation_report"
    results = {}
    for i, (d, p) in enumerate(seats.items()):
        layout, results[d] = device_report(service, p, i)
        if d == "d0":  # the Device's own report path
            coordinator = InProcess(service, p)
            stats = Device(DeviceKey.generate(), dataset(i), coordinator, task_id=tid).run()
            assert coordinator.errors == [] and stats.updates_accepted == 1
        else:
            upload_report(service, p, device_vector(layout, results[d]))
    service.tick()
    (rnd,) = service.list_rounds(tid)
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    expected = plaintext(layout, results)
    released = {k: v for k, v in rnd.metrics.items() if k.startswith("eval.")}
    sketched = {f"eval.v0.{m}.{stat}" for m in ("loss", "accuracy")
                for stat in ("example_q50", "example_rank_error")}
    assert released.keys() == expected.keys() | sketched
    for name, value in expected.items():
        assert released[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # The devices' 120 examples fit in one sketch level: no compaction, exact quantiles.
    assert released["eval.v0.loss.example_rank_error"] == 0.0
    assert_example_quantiles(layout, released, results, (0.5,))
    assert released["eval.v0.devices"] == N
    assert released["eval.v0.examples"] == sum(10 + 7 * i for i in range(N))
    assert service.get_task(tid).record.state is TaskState.COMPLETED
    v0, v1 = service.model_version(tid, 0), service.model_version(tid, 1)
    assert v1.sha256 == v0.sha256  # nothing was trained


def test_a_report_that_breaks_its_bounds_is_refused_and_its_device_is_out(
        service: CoordinatorService, clock: ManualClock) -> None:
    tid = service.create_task(spec()).record.task_id
    p = admit(service, clock, tid, DEVICES)["d1"]
    layout, results = device_report(service, p, 1)
    report = device_vector(layout, results)
    report[layout.index(0, "accuracy", "sum")] = 3.0
    with pytest.raises(InvalidRequest, match="'accuracy' is 3, outside its range"):
        upload_report(service, p, report)
    with pytest.raises(InvalidRequest, match="carried metrics"):
        plan = service.get_plan(p)
        service.begin_upload(UpdateHeader(p, 1, list(plan.update_tensors), 4 * layout.length,
                                          "0" * 64, {"eval_loss": 1.0}))


def test_an_evaluation_of_a_training_tasks_versions_checks_them_at_launch(
        service: CoordinatorService, clock: ManualClock) -> None:
    source = service.create_task(TaskSpec("train", MODEL, rounds=1, clients_per_round=3,
                                          min_reports=2)).record.task_id
    evaluation = FederatedEvaluation(source_task=source)
    task = service.create_task(spec(evaluate=evaluation))
    assert task.spec.evaluate.versions == (0,)  # the latest, resolved and stored
    with pytest.raises(InvalidRequest, match="spec.evaluate.versions: task .* no usable "
                                             "model version 4"):
        service.create_task(spec(evaluate=dataclasses.replace(evaluation, versions=(4,))))
    with pytest.raises(InvalidRequest, match="spec.model: task .* must be the same"):
        service.create_task(spec(model=ModelSpec("mlp", {"input_dim": 4, "hidden": [3],
                                                          "num_classes": 3}),
                                 evaluate=evaluation))
    with pytest.raises(InvalidRequest, match="spec.evaluate.metrics: declares f1, but model "
                                             "'logistic_regression' has no metrics hook"):
        service.create_task(spec(evaluate=FederatedEvaluation(
            metrics={"f1": MetricRange(0, 1)})))
    with pytest.raises(InvalidRequest, match="spec.evaluate.source_task: no task"):
        service.create_task(spec(evaluate=FederatedEvaluation(source_task="nope")))
    with pytest.raises(InvalidRequest, match="is an evaluation task"):
        service.create_task(spec(evaluate=FederatedEvaluation(
            source_task=task.record.task_id)))


SECURE = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001,
                           clip=0.5, phase_timeout_s=5.0)


def run_secure_round(service: CoordinatorService, seats: dict[str, Participation]
                     ) -> tuple[EvaluationLayout, dict[str, dict[int, DeviceResult]]]:
    """Every seated device evaluates and reports through the four SecAgg stages."""
    results: dict[str, dict[int, DeviceResult]] = {}
    layouts: list[EvaluationLayout] = []

    def report(i: int, d: str, p: Participation) -> tuple[EvaluationLayout, np.ndarray]:
        layout, results[d] = device_report(service, p, i)
        layouts.append(layout)
        return layout, device_vector(layout, results[d])

    support.run_secure_round(service, seats, report)
    return layouts[-1], results


def test_under_secure_aggregation_the_results_are_the_plaintext_ones_within_the_bound(
        service: CoordinatorService, clock: ManualClock) -> None:
    tid = service.create_task(spec(secure_aggregation=SECURE)).record.task_id
    seats = admit(service, clock, tid, DEVICES)
    assert service.get_plan(seats["d0"]).metrics is MetricsPolicy.MASKED
    layout, results = run_secure_round(service, seats)
    (rnd,) = service.list_rounds(tid)
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    expected = plaintext(layout, results)
    bounded = [k for k in rnd.metrics if k.endswith("_bound")]
    assert len(bounded) == 2 * len(layout.plan.metrics)
    for name in bounded:
        stat = name.removesuffix("_bound")
        assert abs(rnd.metrics[stat] - expected[stat]) <= rnd.metrics[name], stat
        assert rnd.metrics[name] < 0.01  # the bound is useful, not only true
    assert rnd.metrics["eval.v0.devices"] == pytest.approx(N, abs=1e-3)
    assert rnd.metrics["secagg_clipped_values"] == 0


def central(budget: float) -> PrivacySpec:
    return PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=2.0, delta=1e-5,
                       clip=FixedClip(1.0), sampling=Sampling.FIXED_SIZE, population=N,
                       max_epsilon=budget)


def test_a_dp_evaluation_charges_epsilon_each_round_and_stops_at_the_budget(
        service: CoordinatorService, clock: ManualClock) -> None:
    probe = spec(rounds=5, privacy=central(1e9))
    accountant = TaskPrivacy.for_task(probe)
    assert accountant is not None
    draw = planned_draw(probe)
    two, three = (accountant.epsilon([(2.0, draw)] * k) for k in (2, 3))
    tid = service.create_task(spec(rounds=5, privacy=central((two + three) / 2))).record.task_id
    for _ in range(3):
        if service.get_task(tid).record.state is not TaskState.RUNNING:
            break
        seats = admit(service, clock, tid, DEVICES)
        assert service.get_plan(seats["d0"]).metrics is MetricsPolicy.WITHHELD
        for i, p in seats.items():
            layout, results = device_report(service, p, int(i[1:]))
            upload_report(service, p, device_vector(layout, results))
        service.tick()
    view = service.get_task(tid)
    assert view.record.state is TaskState.BUDGET_EXHAUSTED, view.record.reason
    committed = [r for r in service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert len(committed) == 2
    assert [r.metrics[EPSILON_METRIC] for r in committed] == pytest.approx(
        [accountant.epsilon([(2.0, draw)]), two])
    assert view.privacy is not None and view.privacy.epsilon == pytest.approx(two)
    # Released: noisy sums' summaries; nothing per device was stored.
    noisy_devices = committed[0].metrics["eval.v0.devices"]
    assert abs(noisy_devices - N) < 6 * 2.0 * layout.unit_l2_bound
    assert math.isfinite(committed[0].metrics["eval.v0.loss.mean"])


def test_secure_aggregation_with_central_dp_noises_the_unmasked_sums_and_charges_epsilon(
        service: CoordinatorService, clock: ManualClock) -> None:
    tid = service.create_task(spec(secure_aggregation=SECURE, privacy=central(1e6))
                              ).record.task_id
    seats = admit(service, clock, tid, DEVICES)
    assert service.get_plan(seats["d0"]).metrics is MetricsPolicy.WITHHELD
    layout, _ = run_secure_round(service, seats)
    (rnd,) = service.list_rounds(tid)
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    assert rnd.metrics[EPSILON_METRIC] > 0 and rnd.metrics["secagg_dropped"] == 0
    assert not any(k.endswith("_bound") for k in rnd.metrics)  # the noise dominates
    assert abs(rnd.metrics["eval.v0.devices"] - N) < 6 * 2.0 * layout.unit_l2_bound


def test_a_restarted_coordinator_goes_on_with_an_evaluation_task(
        clock: ManualClock, tmp_path: Path) -> None:
    store = InMemoryStore()
    first = make_service(tmp_path, clock, store=store)
    tid = first.create_task(spec(rounds=2)).record.task_id
    seats = admit(first, clock, tid, DEVICES)
    for i, p in enumerate(seats.values()):
        layout, results = device_report(first, p, i)
        upload_report(first, p, device_vector(layout, results))
    first.tick()
    first.close()
    again = make_service(tmp_path, clock, store=store, seed=1)
    again.recover()
    seats = admit(again, clock, tid, DEVICES)
    plan, data = bundle(again, seats["d0"])
    assert plan.update_tensors[0].numel == layout.length and read_plan(data) == layout.plan
    for i, p in enumerate(seats.values()):
        upload_report(again, p, device_vector(layout, device_report(again, p, i)[1]))
    again.tick()
    assert again.get_task(tid).record.state is TaskState.COMPLETED
    committed = [r for r in again.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert [(r.round_number, r.metrics["eval.v0.devices"]) for r in committed] == [(1, N),
                                                                                    (2, N)]


def test_a_metric_the_model_declares_is_evaluated_on_devices_and_released(
        service: CoordinatorService, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    def confident(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        top = torch.softmax(model(x), dim=1).max(dim=1).values
        return {"confidence": float(top.mean()), "other": 7.0}

    @models.register_model("test_confident", metrics=confident)
    def _confident(input_dim: int, num_classes: int) -> nn.Module:
        return nn.Linear(input_dim, num_classes)

    model = ModelSpec("test_confident", {"input_dim": 4, "num_classes": 3})
    evaluation = FederatedEvaluation(metrics={"confidence": MetricRange(0, 1)},
                                     histograms={"confidence": HistogramBins(bins=10)})
    tid = service.create_task(spec(model=model, evaluate=evaluation)).record.task_id
    seats = admit(service, clock, tid, DEVICES)
    results = {}
    for i, (d, p) in enumerate(seats.items()):
        layout, results[d] = device_report(service, p, i)
        assert set(results[d][0].values) == {"loss", "accuracy", "confidence"}
        upload_report(service, p, device_vector(layout, results[d]))
    service.tick()
    (rnd,) = service.list_rounds(tid)
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    values = [r[0].values["confidence"] for r in results.values()]
    assert rnd.metrics["eval.v0.confidence.device_mean"] == pytest.approx(np.mean(values))
    assert 1 / 3 <= rnd.metrics["eval.v0.confidence.q50"] <= 1
    assert not any("other" in name for name in rnd.metrics)  # undeclared: not reported


def big_dataset(seed: int) -> LocalDataset:
    """A device with 300 to 700 test examples: with max_examples 400, some are capped, and
    every sketch compacts."""
    rng = np.random.default_rng(1000 + seed)
    n = 300 + 100 * seed
    x = rng.normal(size=(n + 10, 4)).astype(np.float32) * 3
    y = rng.integers(0, 3, n + 10)
    return LocalDataset(x_train=x[n:], y_train=y[n:], x_test=x[:n], y_test=y[:n], classes=3)


def test_clear_reports_release_per_example_quantiles_of_the_pooled_examples_within_the_bound(
        service: CoordinatorService, clock: ManualClock) -> None:
    evaluation = FederatedEvaluation(max_examples=400, quantiles=(0.1, 0.5, 0.9), sketch=True)
    task = service.create_task(spec(evaluate=evaluation))
    tid = task.record.task_id
    assert any("per-example quantiles of loss from KLL sketches (k = 200)" in line
               for line in task.launch_checks)
    seats = admit(service, clock, tid, DEVICES)
    results = {}
    for i, (d, p) in enumerate(seats.items()):
        plan, data = bundle(service, p)
        evaluation_plan = read_plan(data)
        assert evaluation_plan is not None and evaluation_plan.sketch is not None
        layout = EvaluationLayout(evaluation_plan)
        results[d] = TorchTrainer(big_dataset(i), d).evaluate_versions(
            plan, evaluation_plan, split_bundle(load_safetensors(data), evaluation_plan))
        upload_report(service, p, device_vector(layout, results[d]))
    service.tick()
    (rnd,) = service.list_rounds(tid)
    assert rnd.state is RoundState.COMMITTED, rnd.failure_reason
    bound = rnd.metrics["eval.v0.loss.example_rank_error"]
    assert 0.0 < bound < 0.02  # compacted, and still a useful bound
    assert not any(k.startswith("eval.v0.accuracy.example_") for k in rnd.metrics)
    assert_example_quantiles(layout, rnd.metrics, results, (0.1, 0.5, 0.9))
    assert rnd.metrics["eval.v0.examples"] == 300 + 400 * 4  # capped at max_examples


def test_a_malformed_sketch_is_refused_naming_it_and_its_device_is_out(
        service: CoordinatorService, clock: ManualClock) -> None:
    tid = service.create_task(spec()).record.task_id
    seats = admit(service, clock, tid, DEVICES)
    layout, results = device_report(service, seats["d2"], 2)
    report = device_vector(layout, results)
    region = layout.sketch_slice(0, layout.plan.metric("loss"))
    report[region.start] = 25.0  # past the loss's range [0, 20]
    with pytest.raises(InvalidRequest, match="evaluation report refused: model version 0: "
                                             "the sketch of metric 'loss': a sketch item is "
                                             "outside the metric's range"):
        upload_report(service, seats["d2"], report)
    with pytest.raises(Late, match="is out of round 1"):  # no second try this round
        upload_report(service, seats["d2"], device_vector(layout, results))
    layout, results = device_report(service, seats["d3"], 3)
    report = device_vector(layout, results)
    report[layout.sketch_slice(0, layout.plan.metric("loss")).stop - 1] = 1.0
    with pytest.raises(InvalidRequest, match="the rest of its region must be 0"):
        upload_report(service, seats["d3"], report)


def test_under_secure_aggregation_or_dp_reports_carry_no_sketch() -> None:
    assert evaluation_setup(spec()).layout.plan.sketch is not None  # type: ignore[union-attr]
    for kw in ({"secure_aggregation": SECURE}, {"privacy": central(1e6)}):
        setup = evaluation_setup(spec(**kw))
        assert setup is not None and setup.layout.plan.sketch is None
        assert setup.layout.sketch_length == 0


def test_reports_carry_sketches_only_where_the_task_asks_for_them() -> None:
    """A sketch sends many of a device's per-example values in the clear: off by default,
    and refused, naming the field, where the reports are protected."""
    plain = spec(evaluate=dataclasses.replace(spec().evaluate, sketch=False))
    setup = evaluation_setup(plain)
    assert setup is not None and setup.layout.plan.sketch is None
    assert setup.layout.sketch_length == 0
    asks = dataclasses.replace(spec().evaluate, sketch=True)
    for kw in ({"secure_aggregation": SECURE}, {"privacy": central(1e6)}):
        with pytest.raises(TaskSpecError, match="'evaluate.sketch': per-example sketches are "
                                                "sent in the clear"):
            validate_task_spec(spec(evaluate=asks, **kw))


def test_a_task_whose_bundle_predates_sketches_keeps_its_bundles_layout() -> None:
    task = spec()
    derived = evaluation_setup(task)
    assert derived is not None and derived.layout.plan.sketch is not None
    older = dataclasses.replace(derived.layout.plan, sketch=None)
    kept = evaluation_setup(task, bundle_plan=older)
    assert kept is not None and kept.layout.plan == older
    assert kept.layout.length < derived.layout.length
    with pytest.raises(ValueError, match="the stored bundle evaluates versions"):
        evaluation_setup(task, bundle_plan=dataclasses.replace(older, versions=(3,)))


def test_a_task_launched_before_sketches_keeps_its_bundles_layout_after_a_restart(
        clock: ManualClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator that did not sketch launched the task (its bundle's plan has no sketch);
    the restarted one reads that plan, so its devices' reports still fit."""
    store = InMemoryStore()
    with monkeypatch.context() as older:
        older.setattr("coordinator.rounds.evaluation_tasks.sketches_examples",
                      lambda spec: False)
        first = make_service(tmp_path, clock, store=store)
        tid = first.create_task(spec(rounds=1)).record.task_id
        first.close()
    again = make_service(tmp_path, clock, store=store, seed=1)
    again.recover()
    seats = admit(again, clock, tid, DEVICES)
    plan, data = bundle(again, seats["d0"])
    stored = read_plan(data)
    assert stored is not None and stored.sketch is None
    derived = evaluation_setup(spec(rounds=1))
    assert derived is not None and plan.update_tensors[0].numel < derived.layout.length
    for i, p in enumerate(seats.values()):
        layout_i, results = device_report(again, p, i)
        assert layout_i.plan == stored
        upload_report(again, p, device_vector(layout_i, results))
    again.tick()
    assert again.get_task(tid).record.state is TaskState.COMPLETED
