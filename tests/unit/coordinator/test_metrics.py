"""Prometheus metrics (:mod:`coordinator.observability.metrics`) and the HTTP side port's
readiness (:mod:`coordinator.http`): counters after real rounds of the real service with a
manual clock; labels bounded; no device id anywhere in the exposition."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.http import Readiness, Verdict, create_app, store_probe
from coordinator.observability.events import EventKind
from coordinator.observability.metrics import PrometheusSink, TaskCollector, TimedStore
from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import Duplicate, InvalidRequest, Late
from coordinator.storage import InMemoryStore
from coordinator.storage.errors import StorageError
from core.protocol import UpdateHeader
from core.tensors import sha256_hex, to_raw_bytes
from tests.unit.coordinator import test_privacy_rounds as dp
from tests.unit.coordinator.test_round_service import (
    admit,
    deltas_like,
    make_service,
    model_params,
    spec,
    upload,
)

T = TypeVar("T")
DEVICES = ["device-alpha", "device-bravo", "device-charlie"]


class Metered:
    """A service on a timed in-memory store, with the sink and the scrape-time collector
    wired as coordinator.app wires them."""

    def __init__(self, clock: ManualClock, tmp_path: Path, *, private: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.store = InMemoryStore()
        timed = TimedStore(self.store, self.registry)
        self.service = (dp.make_service(tmp_path, clock, store=timed) if private  # type: ignore[arg-type]
                        else make_service(timed, clock, tmp_path))  # type: ignore[arg-type]
        self.sink = PrometheusSink(self.registry, now=clock.now, active_window_s=60.0)
        self.service.events.add_sink(self.sink)
        self.registry.register(TaskCollector(self.service, self.store, self.service.events))

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def value(self, name: str, **labels: str) -> float:
        """The sample ``name`` whose labels include ``labels`` (0 if there is none)."""
        for family in text_string_to_metric_families(self.text()):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return float(sample.value)
        return 0.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def metered(clock: ManualClock, tmp_path: Path) -> Metered:
    return Metered(clock, tmp_path)


def test_the_counters_after_a_round_count_its_events(metered: Metered,
                                                     clock: ManualClock) -> None:
    service = metered.service
    task_id = service.create_task(spec(rounds=2)).record.task_id
    seats = admit(service, clock, task_id, DEVICES)
    clock.advance(4.0)
    v = model_params(service, task_id)
    for p in seats.values():
        upload(service, p, deltas_like(v, 0.1))

    m = metered.value
    assert m("fedcoord_tasks_created_total") == 1
    assert m("fedcoord_checkins_total", task=task_id, outcome="retry_later") == 3
    assert m("fedcoord_checkins_total", task=task_id, outcome="accepted") == 3
    assert m("fedcoord_devices_told_to_come_back_total", task=task_id) == 3
    assert m("fedcoord_devices_selected_total", task=task_id) == 3
    assert m("fedcoord_reports_accepted_total", task=task_id) == 3
    assert m("fedcoord_rounds_opened_total", task=task_id) == 2  # round 2 opened at commit
    assert m("fedcoord_rounds_committed_total", task=task_id) == 1
    assert m("fedcoord_round_duration_seconds_count", outcome="committed") == 1
    assert m("fedcoord_commit_seconds_count") == 1
    # Opened at t0, committed after the 1.1 s window and 4 s more.
    assert m("fedcoord_round_duration_seconds_sum", outcome="committed") == pytest.approx(5.1)
    assert m("fedcoord_active_devices") == 3
    assert m("fedcoord_tasks", state="running") == 1
    assert m("fedcoord_store_call_seconds_count", op="commit_round") == 1
    assert m("fedcoord_store_call_seconds_count", op="add_participants") >= 1


def test_grouped_participant_writes_are_timed_as_one_call_per_group(
        metered: Metered, clock: ManualClock) -> None:
    service = metered.service
    service.defer_participant_writes()  # as the device transport runs it
    task_id = service.create_task(spec(rounds=2)).record.task_id
    admit(service, clock, task_id, DEVICES)
    service.flush_participant_writes()
    assert metered.value("fedcoord_store_call_seconds_count", op="write_participants") >= 1
    assert metered.value("fedcoord_store_call_seconds_count", op="add_participants") == 0


def test_refusals_late_updates_failed_rounds_and_drops_are_counted_by_bounded_reason(
        metered: Metered, clock: ManualClock) -> None:
    service = metered.service
    task_id = service.create_task(spec(rounds=2, min_reports=2)).record.task_id
    seats = admit(service, clock, task_id, DEVICES)
    a, b, c = (seats[d] for d in DEVICES)
    v = model_params(service, task_id)
    upload(service, a, deltas_like(v, 0.1))
    with pytest.raises(Duplicate):
        upload(service, a, deltas_like(v, 0.1))
    with pytest.raises(InvalidRequest):
        upload(service, c, {"nope": np.zeros(3, np.float32)})
    service.report_status(c, {}, "training ran out of memory")
    plan = service.get_plan(b)
    clock.advance(31)
    service.tick()  # the deadline, with 1 of the 2 reports needed: the round fails
    payload = to_raw_bytes(deltas_like(v, 0.1))
    with pytest.raises(Late):
        service.begin_upload(UpdateHeader(b, 10, list(plan.update_tensors), len(payload),
                                          sha256_hex(payload), {}))

    m = metered.value
    assert m("fedcoord_uploads_rejected_total", task=task_id, reason="duplicate") == 1
    assert m("fedcoord_uploads_rejected_total", task=task_id, reason="invalid") == 1
    assert m("fedcoord_late_total", task=task_id) == 1
    assert m("fedcoord_rounds_failed_total", task=task_id) == 1
    assert m("fedcoord_round_duration_seconds_count", outcome="failed") == 1
    assert m("fedcoord_devices_dropped_total", task=task_id) == 1
    reasons = {s.labels["reason"] for f in text_string_to_metric_families(metered.text())
               for s in f.samples if f.name == "fedcoord_uploads_rejected"}
    assert reasons == {"duplicate", "invalid"}


def test_unknown_reasons_are_folded_into_other(metered: Metered) -> None:
    hub = metered.service.events
    hub.emit(EventKind.UPLOAD_REJECTED, "t", 1.0, device_id="d", reason="a new reason")
    hub.emit(EventKind.DEVICE_CHECKED_IN, "t", 1.0, device_id="d", reason="surprise")
    hub.emit(EventKind.TASK_ENDED, "t", 1.0, reason="vanished")
    assert metered.value("fedcoord_uploads_rejected_total", reason="other") == 1
    assert metered.value("fedcoord_checkins_total", outcome="other") == 1
    assert metered.value("fedcoord_tasks_ended_total", reason="other") == 1


def test_no_device_id_appears_anywhere_in_the_exposition(metered: Metered,
                                                         clock: ManualClock) -> None:
    service = metered.service
    task_id = service.create_task(spec(rounds=1)).record.task_id
    seats = admit(service, clock, task_id, DEVICES)
    v = model_params(service, task_id)
    for p in seats.values():
        upload(service, p, deltas_like(v, 0.1))
    text = metered.text()
    assert "fedcoord_reports_accepted_total" in text
    for device in DEVICES:
        assert device not in text
    assert "device" not in {label for f in text_string_to_metric_families(text)
                            for s in f.samples for label in s.labels}


def test_active_devices_are_those_seen_within_the_window(metered: Metered,
                                                         clock: ManualClock) -> None:
    task_id = metered.service.create_task(spec(rounds=1)).record.task_id
    for device in DEVICES:
        metered.service.check_in(device, dp.ATTRS, task_id)
    assert metered.sink.active_devices() == 3
    clock.advance(45.0)
    metered.service.check_in(DEVICES[0], dp.ATTRS, task_id)
    clock.advance(30.0)  # the others last checked in 75 s ago: past the 60 s window
    assert metered.sink.active_devices() == 1
    clock.advance(31.0)
    assert metered.sink.active_devices() == 0


def test_epsilon_spent_and_budget_are_read_per_dp_task_at_scrape_time(
        clock: ManualClock, tmp_path: Path) -> None:
    metered = Metered(clock, tmp_path, private=True)
    task_id = metered.service.create_task(dp.spec(rounds=2)).record.task_id
    assert metered.value("fedcoord_epsilon_spent", task=task_id) == 0.0
    assert metered.value("fedcoord_epsilon_budget", task=task_id) == 1000.0
    dp.run_round(metered.service, clock, task_id, ["d0", "d1", "d2", "d3"])
    after_one = metered.value("fedcoord_epsilon_spent", task=task_id)
    dp.run_round(metered.service, clock, task_id, ["d0", "d1", "d2", "d3"])
    after_two = metered.value("fedcoord_epsilon_spent", task=task_id)
    rounds = metered.service.list_rounds(task_id)
    assert 0 < after_one < after_two == pytest.approx(rounds[-1].metrics["dp_epsilon"])
    assert metered.value("fedcoord_tasks", state="completed") == 1
    assert metered.value("fedcoord_epsilon_spent", task=task_id) == after_two  # kept


def test_secagg_dropouts_of_committed_rounds_are_counted(metered: Metered) -> None:
    hub = metered.service.events
    hub.emit(EventKind.ROUND_COMMITTED, "t", 1.0, values={"secagg_dropped": 2.0,
                                                          "seconds": 3.0})
    hub.emit(EventKind.ROUND_COMMITTED, "t", 2.0, values={"seconds": 3.0})
    assert metered.value("fedcoord_secagg_dropped_total", task="t") == 2


# ---------------------------------------------------------------- readiness and the app


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_ready_when_the_store_answers_and_not_after_shutdown_begins() -> None:
    readiness = Readiness(store_probe(InMemoryStore()))
    assert run(readiness.check()).ready
    readiness.shutting_down()
    verdict = run(readiness.check())
    assert not verdict.ready and verdict.reason == "shutting down"


def test_not_ready_when_the_store_fails_or_does_not_answer_in_time() -> None:
    def failing() -> None:
        raise StorageError("database sqlite:///x.db failed: disk I/O error")

    verdict = run(Readiness(failing).check())
    assert not verdict.ready and "disk I/O error" in verdict.reason

    release = threading.Event()

    def stuck() -> None:
        release.wait(10)

    async def twice() -> tuple[Verdict, Verdict]:
        readiness = Readiness(stuck, timeout_s=0.05)
        first = await readiness.check()
        second = await readiness.check()  # the first probe is still stuck: no new thread
        release.set()
        return first, second

    first, second = run(twice())
    assert not first.ready and "did not answer within 0.05 s" in first.reason
    assert not second.ready and "earlier probe" in second.reason


def test_the_app_serves_probes_metrics_and_routes_added_later(metered: Metered) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    readiness = Readiness(store_probe(metered.store))
    app = create_app(registry=metered.registry, readiness=readiness)

    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("dashboard")

    app.add_route("/dashboard", hello)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "text/plain" in metrics.headers["content-type"]
        assert "fedcoord_active_devices" in metrics.text
        assert client.get("/dashboard").text == "dashboard"
        readiness.shutting_down()
        refused = client.get("/readyz")
        assert refused.status_code == 503 and "shutting down" in refused.text
