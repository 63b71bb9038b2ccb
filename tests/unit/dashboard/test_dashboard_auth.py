"""The dashboard behind the admin API's credentials (:mod:`coordinator.dashboard.auth`), with
the real token store of the security layer: no page, stream or model without a valid token."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from coordinator.dashboard import dashboard_app
from coordinator.dashboard.auth import COOKIE
from coordinator.rounds.clock import ManualClock
from coordinator.security.roles import Role
from coordinator.security.service import Security
from coordinator.storage import InMemoryStore, open_security_store
from tests.unit.coordinator.test_round_service import make_service, spec


@pytest.fixture
def security() -> Security:
    return Security(open_security_store(InMemoryStore()))


@pytest.fixture
def client(security: Security, tmp_path: Path) -> TestClient:
    service = make_service(InMemoryStore(), ManualClock(), tmp_path)
    service.create_task(spec(name="secret-task"))
    app = dashboard_app(service, authenticate=security.admin.authenticate)
    return TestClient(app, follow_redirects=False)


def viewer_token(security: Security) -> str:
    _, secret = security.admin.create_token(Role.VIEWER, label="dashboard test")
    return secret


def test_a_page_without_credentials_goes_to_the_login_form(client: TestClient) -> None:
    r = client.get("/tasks/x", headers={"accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/tasks/x"
    form = client.get("/login?next=/tasks/x")
    assert form.status_code == 200 and 'name="token"' in form.text.replace("'", '"')
    assert "secret-task" not in form.text


@pytest.mark.parametrize("path", ["/", "/tasks/x/snapshot.json", "/tasks/x/stream",
                                  "/tasks/x/models/0.safetensors"])
def test_data_without_a_valid_token_is_refused(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"authorization": "Bearer nope"}).status_code == 401
    client.cookies.set(COOKIE, "nope")
    assert client.get(path).status_code == 401


def test_a_bearer_token_opens_the_pages(client: TestClient, security: Security) -> None:
    r = client.get("/", headers={"authorization": f"Bearer {viewer_token(security)}"})
    assert r.status_code == 200 and "secret-task" in r.text


def test_the_login_form_sets_an_http_only_strict_cookie(client: TestClient,
                                                        security: Security) -> None:
    bad = client.post("/login", data={"token": "wrong", "next": "/"})
    assert bad.status_code == 401 and COOKIE not in bad.cookies
    r = client.post("/login", data={"token": viewer_token(security), "next": "/tasks/x"})
    assert r.status_code == 303 and r.headers["location"] == "/tasks/x"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert client.get("/").status_code == 200  # the client keeps the cookie


def test_a_revoked_token_stops_working_at_once(client: TestClient, security: Security) -> None:
    record, secret = security.admin.create_token(Role.VIEWER, label="to revoke")
    headers = {"authorization": f"Bearer {secret}"}
    assert client.get("/", headers=headers).status_code == 200
    security.admin.revoke_token(record.token_id)
    assert client.get("/", headers=headers).status_code == 401


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/", "/\\evil"])
def test_login_never_redirects_off_the_site(client: TestClient, security: Security,
                                            target: str) -> None:
    r = client.post("/login", data={"token": viewer_token(security), "next": target})
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_static_files_need_no_token(client: TestClient) -> None:
    assert client.get("/static/dashboard.css").status_code == 200
