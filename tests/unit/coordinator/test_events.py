"""Events (:mod:`coordinator.observability`): every device and round transition becomes one
numbered record, emitted once its write is stored, on the real service with a manual clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.observability.events import (
    Event,
    EventHub,
    EventKind,
    MemorySink,
    rejection_reason,
)
from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import Duplicate, InvalidRequest, Late
from coordinator.rounds.service import CoordinatorService
from coordinator.storage import InMemoryStore
from core.protocol import UpdateHeader
from core.tensors import sha256_hex, to_raw_bytes
from core.types import TaskState
from tests.unit.coordinator.test_round_service import (
    admit,
    deltas_like,
    make_service,
    model_params,
    spec,
    upload,
)

K = EventKind


@pytest.fixture
def sink(service: CoordinatorService) -> MemorySink:
    sink = MemorySink()
    service.events.add_sink(sink)
    return sink


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return make_service(InMemoryStore(), clock, tmp_path)


def run_round(service: CoordinatorService, clock: ManualClock, task_id: str) -> None:
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    v = model_params(service, task_id)
    for p in seats.values():
        upload(service, p, deltas_like(v, 0.1))


def test_a_round_reads_as_its_events_in_order(service: CoordinatorService, clock: ManualClock,
                                              sink: MemorySink) -> None:
    task_id = service.create_task(spec(rounds=1)).record.task_id
    run_round(service, clock, task_id)
    kinds = sink.kinds(task_id)
    assert kinds[:2] == [K.TASK_CREATED, K.ROUND_OPENED]
    # In the window each device is told to come back; then it is selected. Each check-in
    # is one event, its kind the answer.
    assert kinds.count(K.DEVICE_TOLD_TO_COME_BACK) == 3
    assert kinds.count(K.DEVICE_CHECKED_IN) == 3
    told = [e for e in sink.events if e.kind is K.DEVICE_TOLD_TO_COME_BACK]
    assert {e.reason for e in told} == {"retry_later"}
    assert all(e.values["retry_after_s"] > 0 for e in told)
    assert {e.reason for e in sink.events if e.kind is K.DEVICE_CHECKED_IN} == {"accepted"}
    assert kinds.count(K.DEVICE_SELECTED) == 3 and kinds.count(K.UPLOAD_ACCEPTED) == 3
    assert kinds[-3:] == [K.MODEL_VERSION_CREATED, K.ROUND_COMMITTED, K.TASK_ENDED]
    events = [e for e in sink.events if e.task_id == task_id]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    selected = {e.device_id for e in events if e.kind is K.DEVICE_SELECTED}
    assert selected == {"a", "b", "c"}
    committed = events[-2]
    assert committed.round_number == 1 and committed.values["version"] == 1.0
    assert events[-1].reason == TaskState.COMPLETED.value


def test_a_refused_upload_is_an_event_with_its_reason(service: CoordinatorService,
                                                      clock: ManualClock,
                                                      sink: MemorySink) -> None:
    task_id = service.create_task(spec(rounds=2)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    v = model_params(service, task_id)
    a = seats["a"]
    upload(service, a, deltas_like(v, 0.1))
    with pytest.raises(Duplicate):
        upload(service, a, deltas_like(v, 0.1))
    with pytest.raises(InvalidRequest):
        upload(service, seats["b"], {"nope": np.zeros(3, np.float32)})
    rejected = [e for e in sink.events if e.kind is K.UPLOAD_REJECTED]
    assert [(e.device_id, e.reason) for e in rejected] == [("a", "duplicate"), ("b", "invalid")]
    assert all(e.detail for e in rejected)


def test_a_failed_round_and_a_late_device_are_events(service: CoordinatorService,
                                                     clock: ManualClock,
                                                     sink: MemorySink) -> None:
    task_id = service.create_task(spec(rounds=2, min_reports=2)).record.task_id
    seats = admit(service, clock, task_id, ["a", "b", "c"])
    v = model_params(service, task_id)
    upload(service, seats["a"], deltas_like(v, 0.1))
    plan = service.get_plan(seats["b"])
    clock.advance(31)
    service.tick()  # deadline with 1 of the 2 reports needed
    failed = [e for e in sink.events if e.kind is K.ROUND_FAILED]
    assert len(failed) == 1 and "deadline passed" in failed[0].detail
    payload = to_raw_bytes(deltas_like(v, 0.1))
    with pytest.raises(Late):
        service.begin_upload(UpdateHeader(seats["b"], 10, list(plan.update_tensors),
                                          len(payload), sha256_hex(payload), {}))
    late = [e for e in sink.events if e.kind is K.DEVICE_LATE]
    assert [(e.device_id, e.reason) for e in late] == [("b", "late")]


def test_a_sink_that_raises_never_fails_the_round(service: CoordinatorService,
                                                  clock: ManualClock, sink: MemorySink) -> None:
    class Broken:
        def publish(self, event: Event) -> None:
            raise RuntimeError("the pipeline is down")

        def close(self) -> None:
            pass

    service.events.add_sink(Broken())
    task_id = service.create_task(spec(rounds=1)).record.task_id
    run_round(service, clock, task_id)
    assert service.get_task(task_id).record.state is TaskState.COMPLETED
    assert service.events.sink_failures == len(sink.events) > 0


def test_numbering_is_per_task_and_resumes_after_a_restart() -> None:
    hub = EventHub()
    assert hub.emit(K.TASK_CREATED, "t1", 1.0).seq == 1
    assert hub.emit(K.TASK_CREATED, "t2", 1.0).seq == 1
    assert hub.emit(K.ROUND_OPENED, "t1", 2.0).seq == 2
    restarted = EventHub()
    restarted.resume("t1", 2)
    assert restarted.emit(K.ROUND_OPENED, "t1", 3.0).seq == 3


def test_an_event_survives_json_and_a_foreign_record_is_refused() -> None:
    event = EventHub().emit(K.UPLOAD_REJECTED, "t", 5.0, round_number=2, device_id="d",
                            reason="late", detail="too late", values={"x": 1.5})
    assert Event.from_json(event.to_json()) == event
    with pytest.raises(ValueError, match="schema"):
        Event.from_json({**event.to_json(), "schema": 99})
    with pytest.raises(ValueError):
        Event.from_json({"schema": 1, "kind": "no_such_kind", "task_id": "t", "at": 0})


def test_rejection_reasons_are_a_bounded_set() -> None:
    assert rejection_reason(Late("x")) == "late"
    assert rejection_reason(Duplicate("x")) == "duplicate"
    assert rejection_reason(RuntimeError("x")) == "other"
