"""A/B experiments between model versions in the coordinator's rounds, driven over the service
API with a manual clock: each device evaluates only its arm's version, the arm is a keyed hash
of the device id and the salt stored with the task (the same in every round and after a
restart; a report for another arm is refused), and after every committed round the arms'
statistics and the decision are stored with the round; a stop decision ends the task with
its reason (a guardrail breach, a sample-ratio mismatch, the horizon)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from evaluation_rounds_support import (
    ATTRS,
    MODEL,
    admit,
    layout_of,
    make_service,
    run_secure_round,
    upload,
)

from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import InvalidRequest
from coordinator.rounds.service import CoordinatorService
from coordinator.storage import InMemoryStore
from core.data.dataset import LocalDataset
from core.evaluation import (
    DeviceResult,
    EvaluationLayout,
    device_vector,
    read_plan,
)
from core.experiments import Action, TrafficSplit, assign_arm, srm_check
from core.experiments.spec import parse_experiment_spec
from core.experiments.training import (
    apply_training,
    comparison_task,
    group_task,
    parse_training_arms,
    training_groups,
)
from core.experiments.versions import ACTIONS
from core.protocol import CheckInOutcome, CheckInResult, Participation, Plan, UpdateHeader
from core.security.identity import DeviceKey
from core.taskspec import spec_from_dict, spec_to_dict
from core.types import (
    ArmFilter,
    DeviceAttributes,
    Eligibility,
    FederatedEvaluation,
    ModelSpec,
    RoundState,
    SecAggProtocol,
    SecureAggregation,
    TaskKind,
    TaskSpec,
    TaskState,
)
from device_agent.runtime.device import Device


def experiment(**kw: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "arms": [{"name": "control", "weight": 0.5, "version": 0},
                 {"name": "candidate", "weight": 0.5, "version": 1}],
        "primary_metric": {"name": "accuracy", "direction": "increase"},
        "guardrails": [{"metric": "loss", "max_increase": 0.05}],
        "mde": 0.05, "alpha": 0.05, "horizon_rounds": 3, "salt": "a-fixed-test-salt",
    }
    raw.update(kw)
    return raw


def spec(source: str, devices: int, rounds: int = 3, **kw: object) -> TaskSpec:
    return TaskSpec(
        name="ab", kind=TaskKind.EVALUATE, model=MODEL, rounds=rounds,
        clients_per_round=devices, min_reports=2, over_selection=1.0, round_deadline_s=30.0,
        selection_window_s=1.0,
        evaluate=FederatedEvaluation(source_task=source, max_examples=64,
                                     experiment=parse_experiment_spec(experiment(**kw))))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def trained_task(service: CoordinatorService, clock: ManualClock, *, seed: int = 0,
                 learning_rate: float = 0.05, devices: tuple[str, str] = ("t0", "t1")
                 ) -> str:
    """A one-round training task (zero updates: versions 0 and 1 are its initial model)
    under its own configuration and seed, so its models differ from another such task's."""
    data = apply_training(spec_to_dict(TaskSpec(
        "train", MODEL, rounds=1, clients_per_round=2, min_reports=2, over_selection=1.0,
        selection_window_s=1.0, seed=seed)), (("local.learning_rate", learning_rate),))
    tid = service.create_task(spec_from_dict(data)).record.task_id
    for p in admit(service, clock, tid, list(devices)).values():
        nbytes = sum(t.numel for t in service.get_plan(p).update_tensors) * 4
        upload(service, p, bytes(nbytes), examples=10)
    service.tick()
    assert service.get_task(tid).record.state is TaskState.COMPLETED
    return tid


def model_file(service: CoordinatorService, task_id: str, version: int) -> bytes:
    return b"".join(service.model_chunks(service.model_version(task_id, version), 1 << 20))


def trained_source(service: CoordinatorService, clock: ManualClock) -> str:
    """A training task with versions 0 and 1 (one round of zero updates)."""
    return trained_task(service, clock)


def report(layout: EvaluationLayout, version: int, accuracy: float, loss: float) -> bytes:
    vector = device_vector(layout, {version: DeviceResult(20, {"accuracy": accuracy,
                                                               "loss": loss})})
    return vector.astype("<f4").tobytes()


def run_round(service: CoordinatorService, clock: ManualClock, task_id: str,
              names: list[str], values: dict[int, tuple[float, float]],
              rng: np.random.Generator, reporting: set[int] | None = None) -> dict[str, int]:
    """One round: every device evaluates its arm's version (accuracy, loss: the arm's value
    plus a little noise); only versions in ``reporting`` report. Returns each device's
    version as its plan said."""
    seats = admit(service, clock, task_id, names)
    versions = {}
    for d, p in seats.items():
        layout = layout_of(service, p)
        version = layout.plan.version_for(d)
        assert version is not None
        versions[d] = version
        if reporting is not None and version not in reporting:
            continue
        accuracy, loss = values[version]
        upload(service, p, report(layout, version, float(np.clip(
            accuracy + rng.normal(0, 0.02), 0, 1)), float(loss + rng.normal(0, 0.02))))
    if reporting is not None:
        clock.advance(31.0)  # the rest never report: the deadline releases the round
    service.tick()
    return versions


DEVICES = [f"device-{i}" for i in range(24)]


def test_each_device_keeps_its_arm_across_rounds_and_a_restart_and_counts_once(
        clock: ManualClock, tmp_path: Path) -> None:
    store = InMemoryStore()
    first = make_service(tmp_path, clock, store=store)
    source = trained_source(first, clock)
    half = len(DEVICES) // 2
    created = first.create_task(spec(source, half))
    tid = created.record.task_id
    assert any("experiment: arms control = v0 (50%), candidate = v1 (50%)" in line
               for line in created.launch_checks)
    assert created.spec.evaluate.versions == (0, 1)
    expected = {d: (0, 1)[assign_arm(d, salt="a-fixed-test-salt",
                                     split=TrafficSplit([0.5, 0.5]))] for d in DEVICES}
    assert set(expected.values()) == {0, 1}
    same = {0: (0.7, 1.0), 1: (0.7, 1.0)}
    rng = np.random.default_rng(0)
    assert run_round(first, clock, tid, DEVICES[:half], same, rng) == {
        d: expected[d] for d in DEVICES[:half]}
    first.close()

    again = make_service(tmp_path, clock, store=store, seed=1)
    again.recover()
    # Each device counts once per experiment, after a restart too: the statistics take every
    # report for a new device.
    for d in DEVICES[:half]:
        refused = again.check_in(d, ATTRS, tid)
        assert refused.outcome is CheckInOutcome.NO_TASK
        assert "already counts in experiment" in refused.message
    assert run_round(again, clock, tid, DEVICES[half:], same, rng) == {
        d: expected[d] for d in DEVICES[half:]}
    committed = [r for r in again.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert [r.round_number for r in committed] == [1, 2]
    for r, names in zip(committed, (DEVICES[:half], DEVICES[half:]), strict=True):
        in_control = sum(1 for d in names if expected[d] == 0)
        assert r.metrics["eval.v0.devices"] == in_control
        assert r.metrics["eval.v1.devices"] == half - in_control
        assert r.metrics["experiment.action"] == ACTIONS.index(Action.CONTINUE)
    # Cumulative: every device once.
    assert committed[1].metrics["experiment.control.devices"] == sum(
        1 for v in expected.values() if v == 0)
    assert committed[1].metrics["experiment.srm_p"] > 0.001

    # A device cannot choose its arm: a report for the other version is refused.
    newcomers = [f"newcomer-{i}" for i in range(2)]
    seats = admit(again, clock, tid, newcomers)
    d, p = next(iter(seats.items()))
    layout = layout_of(again, p)
    arm = (0, 1)[assign_arm(d, salt="a-fixed-test-salt", split=TrafficSplit([0.5, 0.5]))]
    other = 1 - arm
    with pytest.raises(InvalidRequest, match=f"is assigned model version {arm} in "
                                             f"this experiment, not {other}"):
        upload(again, p, report(layout, other, 0.9, 0.1))


def test_a_guardrail_breach_stops_the_experiment_and_says_why(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    tid = service.create_task(spec(source, len(DEVICES), rounds=5, horizon_rounds=5)
                              ).record.task_id
    # The candidate is as accurate, but its loss is 0.5 higher than the control's: the
    # guardrail allows 0.05.
    rng = np.random.default_rng(1)
    run_round(service, clock, tid, DEVICES, {0: (0.7, 1.0), 1: (0.7, 1.5)}, rng)
    record = service.get_task(tid).record
    assert record.state is TaskState.COMPLETED
    assert "experiment decision stop_harm after round 1" in record.reason
    assert "guardrail loss breached by candidate" in record.reason
    (rnd,) = [r for r in service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert rnd.metrics["experiment.action"] == ACTIONS.index(Action.STOP_HARM)
    assert rnd.metrics["experiment.candidate.loss.cs_lower"] > 0.05
    assert rnd.metrics["experiment.candidate.loss.diff"] == pytest.approx(0.5, abs=0.05)
    assert service.list_rounds(tid)[-1].round_number == 1  # no round opened after it


def test_a_sample_ratio_mismatch_stops_the_experiment_as_invalid(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    names = [f"device-{i}" for i in range(40)]
    tid = service.create_task(spec(source, len(names))).record.task_id
    # Only the control's devices report (the candidate's crash, say): the arms' device
    # counts no longer match the 50/50 split.
    run_round(service, clock, tid, names, {0: (0.7, 1.0), 1: (0.9, 1.0)},
              np.random.default_rng(2), reporting={0})
    record = service.get_task(tid).record
    assert record.state is TaskState.COMPLETED
    assert "stop_invalid" in record.reason and "sample ratio mismatch" in record.reason


def test_a_better_candidate_wins_and_the_decision_is_stored(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    tid = service.create_task(spec(source, len(DEVICES))).record.task_id
    run_round(service, clock, tid, DEVICES, {0: (0.6, 1.0), 1: (0.9, 1.0)},
              np.random.default_rng(3))
    record = service.get_task(tid).record
    assert record.state is TaskState.COMPLETED
    assert "stop_success" in record.reason and "candidate beats control on accuracy" in \
        record.reason


def test_without_a_difference_the_experiment_ends_at_its_horizon(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    half = len(DEVICES) // 2
    tid = service.create_task(spec(source, half, rounds=4, horizon_rounds=2)).record.task_id
    rng = np.random.default_rng(4)
    for names in (DEVICES[:half], DEVICES[half:]):  # each device counts once
        run_round(service, clock, tid, names, {0: (0.7, 1.0), 1: (0.7, 1.0)}, rng)
    record = service.get_task(tid).record
    assert record.state is TaskState.COMPLETED
    assert "stop_horizon after round 2" in record.reason
    assert len([r for r in service.list_rounds(tid) if r.state is RoundState.COMMITTED]) == 2


def test_an_experiment_stopped_by_an_operator_keeps_the_reason_given(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    tid = service.create_task(spec(source, len(DEVICES))).record.task_id
    with pytest.raises(InvalidRequest, match="reason: at most 500 printable characters"):
        service.cancel_task(tid, "x" * 501)
    service.cancel_task(tid, "v1 ships a known bug")
    record = service.get_task(tid).record
    assert record.state is TaskState.CANCELLED
    assert record.reason == "cancelled by an operator: v1 ships a known bug"


def test_under_secure_aggregation_the_arms_are_counted_from_the_unmasked_sums(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    names = DEVICES[:12]
    secure = SecureAggregation(protocol=SecAggProtocol.SECAGG, threshold=0.6, dropout=0.001,
                               clip=0.5, phase_timeout_s=5.0)
    tid = service.create_task(dataclasses.replace(
        spec(source, len(names)), secure_aggregation=secure)).record.task_id
    seats = admit(service, clock, tid, names)
    arms = {}
    rng = np.random.default_rng(5)

    def device(i: int, d: str, p: Participation) -> tuple[EvaluationLayout, np.ndarray]:
        layout = layout_of(service, p)
        version = arms[d] = layout.plan.version_for(d)
        assert version is not None
        accuracy = (0.5 if version == 0 else 0.9) + rng.normal(0, 0.02)
        return layout, device_vector(layout, {version: DeviceResult(20, {"accuracy": accuracy,
                                                                         "loss": 1.0})})

    run_secure_round(service, seats, device)
    service.tick()
    (rnd,) = [r for r in service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    in_control = sum(1 for v in arms.values() if v == 0)
    assert rnd.metrics["eval.v0.devices"] == pytest.approx(in_control, abs=1e-3)
    assert rnd.metrics["experiment.control.devices"] == in_control
    assert rnd.metrics["experiment.candidate.devices"] == len(names) - in_control
    record = service.get_task(tid).record
    assert "stop_success" in record.reason, record.reason


def test_arms_trained_under_their_own_configurations_are_compared_on_their_devices(
        clock: ManualClock, tmp_path: Path) -> None:
    """A training-configuration experiment on the coordinator: each arm's model comes from
    its own training task (arm ``fast``: the latest version, resolved and stored at launch),
    each device evaluates only its arm's model, and the better configuration wins."""
    from core.evaluation import split_bundle
    from core.tensors import load_safetensors

    service = make_service(tmp_path, clock)
    slow = trained_task(service, clock, seed=1, learning_rate=1e-4, devices=("t0", "t1"))
    fast = trained_task(service, clock, seed=2, learning_rate=0.5, devices=("t2", "t3"))
    arms = parse_training_arms({**experiment(), "arms": [
        {"name": "slow", "weight": 0.5, "training": {"local.learning_rate": 1e-4}},
        {"name": "fast", "weight": 0.5, "training": {"local.learning_rate": 0.5}}]},
        task_rounds=1, default_devices_per_round=len(DEVICES))
    data = comparison_task({**spec_to_dict(spec("", 2)), "rounds": 3}, arms, [slow, fast])
    del data["evaluate"]["experiment"]["arms"][1]["task_version"]  # the latest, at launch
    created = service.create_task(spec_from_dict(data))
    tid = created.record.task_id
    stored = created.spec.evaluate.experiment
    assert stored is not None
    assert [(a.task, a.task_version, a.version) for a in stored.arms] == [
        (slow, 1, 0), (fast, 1, 1)]
    # The bundle (the comparison's version 0) holds each arm's own task's model in its slot.
    raw = model_file(service, tid, 0)
    plan = read_plan(raw)
    assert plan is not None
    slots = split_bundle(load_safetensors(raw), plan)
    for label, source in ((0, slow), (1, fast)):
        trained = load_safetensors(model_file(service, source, 1))
        assert all(np.array_equal(slots[label][k], v) for k, v in trained.items())
    run_round(service, clock, tid, DEVICES, {0: (0.5, 1.0), 1: (0.9, 1.0)},
              np.random.default_rng(6))
    final = service.get_task(tid).record
    assert final.state is TaskState.COMPLETED
    assert "stop_success" in final.reason and "fast beats slow on accuracy" in final.reason


def test_an_arm_naming_a_missing_or_foreign_task_is_refused_naming_the_arm(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    arms = [{"name": "a", "weight": 0.5, "task": source, "task_version": 1},
            {"name": "b", "weight": 0.5, "task": "no-such-task", "task_version": 1}]
    with pytest.raises(InvalidRequest, match=r"spec.evaluate.experiment.arms\[1\].task: no "
                                             r"task with id 'no-such-task'"):
        service.create_task(spec("", 2, arms=arms))
    arms[1]["task"] = source
    arms[1]["task_version"] = 7
    with pytest.raises(InvalidRequest, match=r"arms\[1\].task_version: task .* has no usable "
                                             r"model version 7"):
        service.create_task(spec("", 2, arms=arms))


def test_a_partitioned_arms_training_task_admits_only_its_arms_devices(
        clock: ManualClock, tmp_path: Path) -> None:
    """``partition_training: true`` on a coordinator: each arm's training task carries the
    arm's filter (``eligibility.arm``); a device of the other arm is never admitted to it
    (named, it is told there is no task for it; unnamed, it is offered its own arm's task),
    after a restart too (the filter is stored with the task), and in the comparison every
    device evaluates the model of the arm it trained."""
    store = InMemoryStore()
    first = make_service(tmp_path, clock, store=store)
    arms = parse_training_arms({**experiment(), "partition_training": True, "arms": [
        {"name": "slow", "weight": 0.5, "training": {"local.learning_rate": 1e-4}},
        {"name": "fast", "weight": 0.5, "training": {"local.learning_rate": 0.5}}]},
        task_rounds=1, default_devices_per_round=len(DEVICES))
    base = spec_to_dict(TaskSpec("train", MODEL, rounds=1, clients_per_round=len(DEVICES),
                                 min_reports=2, over_selection=1.0, round_deadline_s=30.0,
                                 selection_window_s=1.0))
    tasks = [first.create_task(spec_from_dict(group_task(base, g, name=f"train-{i}")))
             .record.task_id for i, g in enumerate(training_groups(arms))]
    first.close()
    service = make_service(tmp_path, clock, store=store, seed=1)
    service.recover()
    arm_of = {d: assign_arm(d, salt="a-fixed-test-salt", split=TrafficSplit([0.5, 0.5]))
              for d in DEVICES}
    members = [[d for d in DEVICES if arm_of[d] == a] for a in (0, 1)]
    assert all(len(m) >= 2 for m in members)

    # Unnamed, a device is only ever offered its own arm's task.
    for d in DEVICES:
        offered = service.check_in(d, ATTRS, None)
        assert offered.task_id == tasks[arm_of[d]], (d, offered)
    # Named, the other arm's devices are turned away: in the window and after it closed.
    for d in members[1]:
        refused = service.check_in(d, ATTRS, tasks[0])
        assert refused.outcome is CheckInOutcome.NO_TASK
        assert "only the devices of experiment arm 0" in refused.message
    seats = {a: admit(service, clock, tasks[a], members[a]) for a in (0, 1)}
    for d in members[1]:
        assert service.check_in(d, ATTRS, tasks[0]).outcome is CheckInOutcome.NO_TASK
    for a in (0, 1):
        assert set(seats[a]) == set(members[a])
        for p in seats[a].values():
            nbytes = sum(t.numel for t in service.get_plan(p).update_tensors) * 4
            upload(service, p, bytes(nbytes), examples=10)
    clock.advance(31.0)  # a cohort of half the devices: the deadline releases the rounds
    service.tick()
    assert [service.get_task(t).record.state for t in tasks] == [TaskState.COMPLETED] * 2

    # The comparison assigns by the same salt and split: a device evaluates its own arm.
    data = comparison_task({**spec_to_dict(spec("", 2)), "rounds": 3}, arms, tasks)
    tid = service.create_task(spec_from_dict(data)).record.task_id
    versions = run_round(service, clock, tid, DEVICES, {0: (0.5, 1.0), 1: (0.5, 1.0)},
                         np.random.default_rng(7))
    assert versions == arm_of


def test_under_dp_an_arms_task_samples_its_arm_at_the_rate_the_accountant_charges(
        clock: ManualClock, tmp_path: Path) -> None:
    """The filter is a fixed sub-population, applied before selection: a central-DP arm task
    (fixed-size sampling, the whole population of 24 configured) sees only its arm's devices
    in the window, so the accountant's q is the cohort over the arm's devices, and each of
    them is included at that rate; no other device ever is."""
    from core.privacy.accounting import Sampling
    from core.privacy.spec import FixedClip, PrivacyMode, PrivacySpec

    population, goal, rounds = 24, 4, 30
    devices = [f"dp-{i}" for i in range(population)]
    arm = ArmFilter("a-fixed-test-salt", (0.5, 0.5), 1)
    members = [d for d in devices if arm.admits(d)]
    service = make_service(tmp_path, clock, seed=3)
    tid = service.create_task(TaskSpec(
        "dp-arm", ModelSpec("logistic_regression", {"input_dim": 2, "num_classes": 2}),
        rounds=rounds, clients_per_round=goal, min_reports=goal, over_selection=1.0,
        round_deadline_s=30.0, selection_window_s=1.0, eligibility=Eligibility(arm=arm),
        privacy=PrivacySpec(mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5,
                            clip=FixedClip(0.5), sampling=Sampling.FIXED_SIZE,
                            population=population, max_epsilon=1e6))).record.task_id
    included = dict.fromkeys(devices, 0)
    for _ in range(rounds):
        for d in devices:
            service.check_in(d, ATTRS, tid)
        clock.advance(1.1)
        for d in devices:
            r = service.check_in(d, ATTRS, tid)
            if r.outcome is CheckInOutcome.ACCEPTED:
                included[d] += 1
                p = Participation(d, tid, r.round_number, r.token)
                nbytes = sum(t.numel for t in service.get_plan(p).update_tensors) * 4
                upload(service, p, bytes(nbytes), examples=10)
    committed = service.list_rounds(tid)
    assert len(committed) == rounds
    q = goal / len(members)
    assert {r.metrics["dp_sampling_rate"] for r in committed} == {q}
    assert all(included[d] == 0 for d in devices if d not in members)
    rates = np.array([included[d] for d in members]) / rounds
    assert rates.mean() == pytest.approx(q)
    assert np.all(np.abs(rates - q) < 4.5 * np.sqrt(q * (1 - q) / rounds))


# ---------------------------------------------------------------- per-stratum splits

#: Low-end devices never get the candidate (weight 0); high-end ones get it at 90%.
STRATA = {"low_end": {"control": 1.0}, "high_end": {"control": 0.1, "candidate": 0.9}}


def admit_declaring(service: CoordinatorService, clock: ManualClock, task_id: str,
                    strata: dict[str, str | None]) -> dict[str, Participation]:
    """:func:`admit`, each device declaring its stratum at both check-ins."""
    for d, s in strata.items():
        service.check_in(d, ATTRS, task_id, stratum=s)
    clock.advance(1.1)
    seats = {}
    for d, s in strata.items():
        r = service.check_in(d, ATTRS, task_id, stratum=s)
        assert r.outcome is CheckInOutcome.ACCEPTED, r.message
        seats[d] = Participation(d, task_id, r.round_number, r.token)
    return seats


def test_devices_of_two_strata_evaluate_the_arms_their_strata_split_gives(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    declared: dict[str, str | None] = {f"low-{i}": "low_end" for i in range(24)}
    declared |= {f"high-{i}": "high_end" for i in range(8)}
    declared |= {"plain-0": None, "other-0": "tablet"}  # the default split, both
    tid = service.create_task(spec(source, len(declared), strata=STRATA)).record.task_id
    split = parse_experiment_spec(experiment(strata=STRATA)).split()
    seats = admit_declaring(service, clock, tid, declared)
    versions = {}
    for d, p in seats.items():
        layout = layout_of(service, p)
        version = layout.plan.version_for(d, declared[d])
        # The plan a device gets gives the arm of its stratum's split (the stratum never
        # enters the hash: the same u, another split).
        assert version == (0, 1)[assign_arm(d, salt="a-fixed-test-salt", split=split,
                                            stratum=declared[d])]
        versions[d] = version
        upload(service, p, report(layout, version, 0.7, 1.0))
    assert {versions[d] for d in declared if d.startswith("low-")} == {0}  # weight 0: none
    high_candidates = sum(1 for d in declared if d.startswith("high-") and versions[d] == 1)
    assert high_candidates >= 6  # 90% of 8 (binomial; fixed salt)
    service.tick()
    (rnd,) = [r for r in service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    m = rnd.metrics
    assert m["eval.strata.low_end.v0.devices"] == 24
    assert m["eval.strata.low_end.v1.devices"] == 0
    assert m["eval.strata.high_end.v1.devices"] == high_candidates
    assert m["eval.strata.high_end.v0.devices"] == 8 - high_candidates
    assert m["eval.strata.*.v0.devices"] + m["eval.strata.*.v1.devices"] == 2
    # Checked against the strata seen, the arms hold the shares they should; the pooled
    # counts against the default 50/50 split look skewed (p < 0.01).
    assert m["experiment.srm_p"] > 0.001
    assert m["experiment.action"] == ACTIONS.index(Action.CONTINUE)
    pooled = [int(m["eval.v0.devices"]), int(m["eval.v1.devices"])]
    assert srm_check(pooled, [0.5, 0.5]).p_value < 0.01 < m["experiment.srm_p"]


def test_a_report_for_another_arm_than_the_strata_split_gives_is_refused(
        clock: ManualClock, tmp_path: Path) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    tid = service.create_task(spec(source, 4, strata=STRATA)).record.task_id
    # A low-end device whose default-split arm is the candidate: its stratum excludes it.
    default = TrafficSplit([0.5, 0.5])
    low = next(f"dev-{i}" for i in range(100)
               if assign_arm(f"dev-{i}", salt="a-fixed-test-salt", split=default) == 1)
    seats = admit_declaring(service, clock, tid, {low: "low_end", "x-1": None,
                                                  "x-2": None, "x-3": None})
    layout = layout_of(service, seats[low])
    with pytest.raises(InvalidRequest, match="is assigned model version 0 in this "
                                             "experiment, not 1"):
        upload(service, seats[low], report(layout, 1, 0.9, 0.1))


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "x" * 33, "é"])
def test_a_bad_stratum_is_refused_naming_the_field(
        clock: ManualClock, tmp_path: Path, bad: str) -> None:
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    tid = service.create_task(spec(source, 2, strata=STRATA)).record.task_id
    if bad == "":  # the wire's "" is no stratum (convert maps it to None): not an error
        with pytest.raises(InvalidRequest, match="stratum: must not be empty"):
            service.check_in("dev-0", ATTRS, tid, stratum=bad)
        return
    with pytest.raises(InvalidRequest, match="^stratum: must "):
        service.check_in("dev-0", ATTRS, tid, stratum=bad)


class DeclaringDevice:
    """A Device's coordinator, answered by the service in process (clear uploads only): it
    forwards the check-in with the stratum the Device declares, once."""

    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.declared: list[str | None] = []
        self.errors: list[str] = []

    def enroll(self, key: DeviceKey, enrollment_token: str = "", attestation: bytes = b""
               ) -> str:
        return key.device_id

    def check_in(self, key: DeviceKey, attrs: DeviceAttributes, task_id: str | None, *,
                 schema: object = None, declined: object = (), stratum: str | None = None
                 ) -> CheckInResult:
        if self.declared:
            return CheckInResult(CheckInOutcome.FINISHED, message="done")
        self.declared.append(stratum)
        return self.service.check_in(key.device_id, attrs, task_id, stratum=stratum)

    def get_plan(self, p: Participation) -> Plan:
        return self.service.get_plan(p)

    def download_model(self, p: Participation, plan: Plan) -> bytes:
        record = self.service.model_for_participant(p, plan.model_version)
        return b"".join(self.service.model_chunks(record, 1 << 20))

    def upload_update(self, header: UpdateHeader, payload: bytes, chunk_bytes: int) -> str:
        up = self.service.begin_upload(header)
        up.write(payload)
        return self.service.finish_upload(up)

    def report_status(self, p: Participation, *, metrics: dict[str, float] | None = None,
                      error: str = "", decline: bool = False) -> None:
        self.errors.append(error)


def test_the_agents_device_evaluates_its_strata_arm_and_is_accepted(
        clock: ManualClock, tmp_path: Path) -> None:
    """The Device runtime declares its stratum and evaluates the arm its stratum's split
    gives: a low-end device whose default-split arm is the candidate evaluates the control
    (the candidate has weight 0 there), and the coordinator takes its report."""
    service = make_service(tmp_path, clock)
    source = trained_source(service, clock)
    tid = service.create_task(spec(source, 3, strata=STRATA)).record.task_id
    key = next(k for k in (DeviceKey.generate() for _ in range(200))
               if assign_arm(k.device_id, salt="a-fixed-test-salt",
                             split=TrafficSplit([0.5, 0.5])) == 1)
    seats = admit_declaring(service, clock, tid, {key.device_id: "low_end", "x-1": None,
                                                  "x-2": None})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    data = LocalDataset(x_train=x[20:], y_train=y[20:], x_test=x[:20], y_test=y[:20],
                        classes=3)
    coordinator = DeclaringDevice(service)
    stats = Device(key, data, coordinator, task_id=tid, stratum="low_end").run()  # type: ignore[arg-type]
    assert coordinator.declared == ["low_end"]
    assert coordinator.errors == [] and stats.updates_accepted == 1
    for d in ("x-1", "x-2"):
        layout = layout_of(service, seats[d])
        version = layout.plan.version_for(d)
        assert version is not None
        upload(service, seats[d], report(layout, version, 0.7, 1.0))
    service.tick()
    (rnd,) = [r for r in service.list_rounds(tid) if r.state is RoundState.COMMITTED]
    assert rnd.metrics["eval.strata.low_end.v0.devices"] == 1
