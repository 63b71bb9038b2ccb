"""The dashboard's routes over a real service (in-memory store, manual clock): pages, the
live stream of a finished task, model downloads, 404s and escaping. No browser, no network
(starlette's TestClient calls the app in process)."""

from __future__ import annotations

import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from coordinator.dashboard import DashboardFeed, dashboard_app
from coordinator.dashboard.app import SECURITY_HEADERS
from coordinator.rounds.clock import ManualClock
from coordinator.rounds.service import CoordinatorService
from coordinator.storage import InMemoryStore
from core.types import Evaluation, ModelSpec, RoundState
from tests.unit.coordinator.test_round_service import (
    ATTRS,
    admit,
    deltas_like,
    make_service,
    model_params,
    spec,
    upload,
)

XSS = "<script>alert(1)</script>"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def service(clock: ManualClock, tmp_path: Path) -> CoordinatorService:
    return make_service(InMemoryStore(), clock, tmp_path)


@pytest.fixture
def client(service: CoordinatorService) -> TestClient:
    return TestClient(dashboard_app(service))


def digits_spec(**kw: object) -> object:
    return spec(model=ModelSpec("logistic_regression", {"input_dim": 64, "num_classes": 10}),
                evaluation=Evaluation(server_data="digits:split=test"), **kw)


def run_round(service: CoordinatorService, clock: ManualClock, task_id: str,
              devices: list[str]) -> None:
    seats = admit(service, clock, task_id, devices)
    params = model_params(service, task_id)
    for p in seats.values():
        upload(service, p, deltas_like(params, 0.01))


def chart_points(page: str, series: str) -> list[list[float]]:
    match = re.search(rf'data-series="{series}" data-points="([^"]*)"', page)
    assert match is not None, f"no {series} chart"
    points: list[list[float]] = json.loads(html.unescape(match.group(1)))
    return points


def last_snapshot(stream: str) -> dict[str, Any]:
    """The last ``snapshot`` message of an event stream's text (a snapshot may be sent
    twice: a rebuilt one follows one that was current when the stream opened)."""
    blocks = [b for b in stream.split("\n\n") if b.startswith("event: snapshot\n")]
    message: dict[str, Any] = json.loads(blocks[-1].split("data: ", 1)[1])
    return message


def test_the_tasks_page_lists_each_task_with_its_state_and_a_link(
        service: CoordinatorService, client: TestClient) -> None:
    assert "No tasks yet" in client.get("/").text
    task_id = service.create_task(spec(name="first")).record.task_id
    page = client.get("/")
    assert page.status_code == 200
    assert f'href="/tasks/{task_id}"' in page.text and ">first</a>" in page.text
    assert "state-running" in page.text
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value


@pytest.mark.slow  # server evaluation on digits: torch and the data set load
def test_the_task_page_shows_the_rounds_and_the_curves_hold_the_stored_metrics(
        service: CoordinatorService, clock: ManualClock, client: TestClient) -> None:
    task_id = service.create_task(digits_spec(rounds=2)).record.task_id
    run_round(service, clock, task_id, ["a", "b", "c"])
    page = client.get(f"/tasks/{task_id}").text
    committed = [r for r in service.list_rounds(task_id) if r.state is RoundState.COMMITTED]
    assert chart_points(page, "accuracy") == [
        [r.round_number, r.metrics["server_eval_accuracy"]] for r in committed]
    assert chart_points(page, "loss") == [
        [r.round_number, r.metrics["server_eval_loss"]] for r in committed]
    assert '<span data-field="rounds_committed">1</span>' in page
    # The funnel of round 1 from the events: three checked in, told to come back, selected.
    row = re.search(r'<tr data-round="1" data-attempt="1"><td>1\.1</td>(.*?)</tr>', page)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    assert cells[:5] == ["3", "3", "3", "3", "3"]  # checked in, come back, selected, goal, reported
    assert f'href="/tasks/{task_id}/models/1.safetensors"' in page
    assert 'src="/static/dashboard.js"' in page and "<script>" not in page
    data = client.get(f"/tasks/{task_id}/snapshot.json").json()
    assert data["rounds_committed"] == 1 and data["current_round"] == 2


def test_a_failed_attempt_shows_its_reason(service: CoordinatorService, clock: ManualClock,
                                           client: TestClient) -> None:
    task_id = service.create_task(spec()).record.task_id
    admit(service, clock, task_id, ["a", "b", "c"])
    clock.advance(31)
    service.tick()
    page = client.get(f"/tasks/{task_id}").text
    assert 'data-round="1" data-attempt="1" data-state="failed"' in page
    assert "deadline passed with 0 of the 2 reports needed" in page


def test_the_stream_of_a_finished_task_sends_its_snapshot_then_ends(
        service: CoordinatorService, client: TestClient) -> None:
    task_id = service.create_task(spec()).record.task_id
    service.cancel_task(task_id)
    with client.stream("GET", f"/tasks/{task_id}/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    blocks = [b for b in body.split("\n\n") if b]
    assert blocks[0].startswith("event: snapshot\n") and blocks[-1].startswith("event: end")
    message = last_snapshot(body)
    assert message["final"] is True and message["summary"]["state"] == "cancelled"
    assert set(message["panels"]) >= {"panel-timeline", "panel-funnel", "panel-charts"}


def test_a_model_version_downloads_as_the_stored_file(service: CoordinatorService,
                                                      client: TestClient) -> None:
    task_id = service.create_task(spec()).record.task_id
    record = service.model_version(task_id, 0)
    response = client.get(f"/tasks/{task_id}/models/0.safetensors")
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == record.sha256
    assert response.headers["x-content-sha256"] == record.sha256
    assert f'filename="{task_id}-v0.safetensors"' in response.headers["content-disposition"]
    assert client.get(f"/tasks/{task_id}/models/7.safetensors").status_code == 404


def test_model_downloads_can_be_turned_off(service: CoordinatorService) -> None:
    client = TestClient(dashboard_app(service, feed=DashboardFeed(), model_downloads=False))
    task_id = service.create_task(spec()).record.task_id
    assert "/models/" not in client.get(f"/tasks/{task_id}").text
    assert client.get(f"/tasks/{task_id}/models/0.safetensors").status_code == 404


def test_an_unknown_task_is_a_404_that_names_it_escaped(client: TestClient) -> None:
    response = client.get("/tasks/%3Cb%3Enope")
    assert response.status_code == 404 and "&lt;b&gt;nope" in response.text
    assert "<b>nope" not in response.text
    assert client.get("/tasks/nope/stream").status_code == 404


def test_a_task_named_like_a_script_renders_inert(service: CoordinatorService,
                                                  client: TestClient) -> None:
    task_id = service.create_task(spec(name=XSS)).record.task_id
    for url in ("/", f"/tasks/{task_id}"):
        page = client.get(url).text
        assert XSS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    service.cancel_task(task_id)
    with client.stream("GET", f"/tasks/{task_id}/stream") as response:
        body = "".join(response.iter_text())
    message = last_snapshot(body)
    assert all(XSS not in markup for markup in message["panels"].values())
    assert message["summary"]["state"] == "cancelled"


def test_the_static_script_and_style_are_served(client: TestClient) -> None:
    js = client.get("/static/dashboard.js")
    assert js.status_code == 200 and "EventSource" in js.text
    assert client.get("/static/dashboard.css").status_code == 200


def test_a_private_task_charts_epsilon_against_its_budget(tmp_path: Path) -> None:
    from tests.unit.coordinator import test_privacy_rounds as dp

    clock = ManualClock()
    service = dp.make_service(tmp_path, clock)
    client = TestClient(dashboard_app(service))
    task_id = service.create_task(dp.spec(rounds=2)).record.task_id
    seats = dp.admit(service, clock, task_id, ["a", "b", "c", "d"])
    size = len(dp.flat_params(service, task_id))
    for p in seats.values():
        dp.upload(service, p, np.zeros(size, dtype=np.float32))
    page = client.get(f"/tasks/{task_id}").text
    view = service.get_task(task_id)
    assert view.privacy is not None
    committed = [r for r in service.list_rounds(task_id) if r.state is RoundState.COMMITTED]
    assert chart_points(page, "epsilon") == [
        [r.round_number, r.metrics["dp_epsilon"]] for r in committed] != []
    assert 'class="limit"' in page and f"budget {view.privacy.budget:.4g}" in page
    assert '<span data-field="epsilon">' in page and f"{view.privacy.epsilon:.4g} of" in page


def test_mounted_at_the_root_of_the_http_port_the_ports_own_routes_still_answer(
        service: CoordinatorService) -> None:
    from prometheus_client import CollectorRegistry

    from coordinator.http import Readiness, create_app

    app = create_app(registry=CollectorRegistry(), readiness=Readiness(lambda: None))
    app.mount("/", dashboard_app(service))
    client = TestClient(app)
    task_id = service.create_task(spec(name="mounted")).record.task_id
    assert client.get("/healthz").text == "ok\n"
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert ">mounted</a>" in client.get("/").text
    assert client.get(f"/tasks/{task_id}").status_code == 200
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/tasks/nope").status_code == 404


class CountingService:
    """The two reads Snapshots makes, counted."""

    def __init__(self, service: CoordinatorService) -> None:
        self.service = service
        self.views = 0
        self.round_reads = 0

    def get_task(self, task_id: str) -> object:
        self.views += 1
        return self.service.get_task(task_id)

    def list_rounds(self, task_id: str) -> object:
        self.round_reads += 1
        return self.service.list_rounds(task_id)


def test_snapshots_are_shared_and_rebuilt_on_events_or_age_only(
        service: CoordinatorService, clock: ManualClock) -> None:
    from typing import cast

    from coordinator.dashboard.app import Snapshots

    feed = DashboardFeed()
    service.events.add_sink(feed)
    counting = CountingService(service)
    now = [0.0]
    snapshots = Snapshots(cast(CoordinatorService, counting), feed, max_age_s=1.0,
                          clock=lambda: now[0])
    task_id = service.create_task(spec()).record.task_id
    first = snapshots.get(task_id)
    assert snapshots.get(task_id) is first and (counting.views, counting.round_reads) == (1, 1)
    assert snapshots.message(task_id)[1] is snapshots.message(task_id)[1], "rendered once"
    now[0] = 1.5  # older than max_age: the rounds are read again, the view is reused
    assert snapshots.get(task_id) is not first
    assert (counting.views, counting.round_reads) == (1, 2)
    service.check_in("a", ATTRS, task_id)  # an event: the view is taken again
    now[0] = 1.6
    assert snapshots.get(task_id).seq > first.seq
    assert (counting.views, counting.round_reads) == (2, 3)
