"""The dashboard in a real browser (headless Debian chromium driven by playwright) over a real
coordinator: its gRPC server and the HTTP side port with the dashboard on one event loop, a
real task run by one agent process. The page must follow the rounds live (no reload), its accuracy chart
must hold the values the database has, and a task named like a script must stay text.

Screenshots go to ``test-artifacts/dashboard/`` (``$FEDCOORD_TEST_ARTIFACTS`` overrides the
root); the test prints the folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ADMIN_TOKEN,
    ADMIN_TOKEN_FILE,
    ENV,
    FEDCTL_CMD,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from coordinator.app import Coordinator
from coordinator.settings import CoordinatorSettings
from fedctl.admin import AdminClient

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
XSS = "<script>alert(1)</script>"
ARTIFACTS = Path(os.environ.get("FEDCOORD_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "test-artifacts"))


def _browser_or_skip() -> Any:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: the browser tests drive Debian's chromium "
                    "(apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install -e '.[dev]')")
    return sync_playwright


@dataclass
class Served:
    target: str
    url: str

    def admin(self) -> AdminClient:
        return AdminClient(self.target, token=ADMIN_TOKEN)

    def launch(self, task_file: Path) -> str:
        out = subprocess.run([*FEDCTL_CMD, "task", "launch", str(task_file), "--coordinator",
                              self.target], capture_output=True, text=True, env=ENV,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()


def log_in(page: Any, url: str) -> None:
    """The dashboard needs a token: a page asked for without one goes to the login form."""
    page.goto(url + "/")
    page.wait_for_url("**/login?next=/")
    page.fill("input[name=token]", ADMIN_TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")


def _mounts_root(app: Any) -> bool:
    from starlette.routing import Mount

    return any(isinstance(r, Mount) and r.path == "" for r in app.routes)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A coordinator with its HTTP side port (``http_port``: coordinator.http on the
    coordinator's event loop) and the dashboard at ``/`` of it."""
    workdir = tmp_path_factory.mktemp("dashboard")
    config = CoordinatorSettings(db_url=f"sqlite:///{workdir}/coordinator.db",
                                 store_dir=workdir / "store", port=0, http_port=0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="coordinator")
    thread.start()
    state: dict[str, Any] = {}

    async def start() -> tuple[int, int]:
        coordinator = state["coordinator"] = Coordinator(config)
        coordinator.security.bootstrap_admin_token(ADMIN_TOKEN_FILE)
        assert coordinator.http_app is not None and _mounts_root(coordinator.http_app)
        port = await coordinator.start()
        return port, coordinator.http_port

    port, http_port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=60)
    try:
        yield Served(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}")
    finally:
        asyncio.run_coroutine_threadsafe(state["coordinator"].stop(0.5), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.fixture
def artifacts(request: pytest.FixtureRequest) -> Path:
    folder = ARTIFACTS / "dashboard" / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"\nscreenshots: {folder}")
    return folder


def test_the_task_page_follows_the_rounds_live_and_charts_the_stored_accuracy(
        served: Served, tmp_path: Path, artifacts: Path) -> None:
    sync_playwright = _browser_or_skip()
    task_id = served.launch(write_task(tmp_path / "task.yaml", name="digits live", rounds=3,
                                       clients_per_round=3, min_reports=3))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            # The page's Content-Security-Policy forbids eval, which playwright's waits use.
            page = browser.new_page(viewport={"width": 1280, "height": 1400}, bypass_csp=True)
            page.goto(served.url + "/healthz")
            assert page.text_content("body") == "ok\n", "the side port's own routes still answer"
            log_in(page, served.url)
            page.get_by_role("link", name="digits live").click()
            page.wait_for_url(f"**/tasks/{task_id}")
            assert page.text_content('[data-field="rounds_committed"]') == "0"
            page.wait_for_function("document.getElementById('live').textContent === 'live'")
            # Every value the round count takes, seen in the page without reloading it.
            page.evaluate("""() => {
                window.__loadedOnce = true;
                window.__counts = [];
                const el = document.querySelector('[data-field="rounds_committed"]');
                new MutationObserver(() => window.__counts.push(el.textContent))
                    .observe(el, {childList: true, characterData: true, subtree: true});
            }""")
            page.screenshot(path=str(artifacts / "1-before-rounds.png"), full_page=True)

            agent = start_agent(served.target, "dash", "digits:shard=0/3", devices=3,
                                task_id=task_id, log=tmp_path / "agent.log")
            try:
                page.wait_for_function(
                    "document.querySelector('[data-field=\"rounds_committed\"]')"
                    ".textContent === '1'", timeout=120_000)
                page.screenshot(path=str(artifacts / "2-one-round.png"), full_page=True)
                with served.admin() as client:
                    task = wait_for_task(client, task_id, timeout_s=180)
                    rounds = client.list_rounds(task_id)
                assert task.state == "completed", (tmp_path / "agent.log").read_text()
                page.wait_for_function(
                    "document.getElementById('task').dataset.final === 'true'", timeout=30_000)
            finally:
                stop_all([agent])
            page.screenshot(path=str(artifacts / "3-completed.png"), full_page=True)

            assert page.evaluate("window.__loadedOnce") is True, "the page was reloaded"
            counts = [int(c) for c in page.evaluate("window.__counts")]
            assert counts and counts == sorted(counts) and counts[-1] == 3, counts
            assert page.text_content('[data-field="state"]') == "completed"
            assert page.text_content("#live") == "task finished"

            points = json.loads(page.get_attribute(
                'svg[data-series="accuracy"]', "data-points") or "[]")
            stored = [[r.round_number, r.metrics["server_eval_accuracy"]]
                      for r in rounds if r.state == "committed"]
            assert [p[0] for p in points] == [1, 2, 3] == [s[0] for s in stored]
            assert [p[1] for p in points] == pytest.approx([s[1] for s in stored], rel=1e-9)
            dots = page.locator('svg[data-series="accuracy"] circle')
            assert dots.count() == 3
            # The funnel's selected and reported columns are the database's.
            for r in rounds:
                row = page.locator(f'#panel-funnel tr[data-round="{r.round_number}"]'
                                   f'[data-attempt="{r.attempt}"]')
                assert row.locator('[data-col="selected"]').text_content() == str(r.selected)
                assert row.locator('[data-col="reported"]').text_content() == str(r.reports)
            versions = page.locator("#panel-models li").evaluate_all(
                "items => items.map(li => li.dataset.version)")
            assert versions == ["3", "2", "1", "0"]
            with page.expect_download() as download:
                page.locator('#panel-models li[data-version="3"] a').click()
            saved = artifacts / "model-v3.safetensors"
            download.value.save_as(saved)
            assert saved.stat().st_size > 0
        finally:
            browser.close()


def test_a_task_named_like_a_script_renders_as_text(served: Served, tmp_path: Path,
                                                    artifacts: Path) -> None:
    sync_playwright = _browser_or_skip()
    task_id = served.launch(write_task(tmp_path / "xss.yaml", name=json.dumps(XSS)))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            # Without the page's Content-Security-Policy: escaping alone keeps it inert.
            page = browser.new_page(bypass_csp=True)
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            log_in(page, served.url)
            assert page.get_by_role("link", name=XSS).count() == 1
            page.goto(f"{served.url}/tasks/{task_id}")
            page.wait_for_function("document.getElementById('live').textContent === 'live'")
            assert page.text_content("h1") == XSS
            time.sleep(0.5)
            page.screenshot(path=str(artifacts / "script-named-task.png"), full_page=True)
            assert dialogs == []
            assert page.locator("main script").count() == 0
        finally:
            browser.close()
    with served.admin() as client:
        client.cancel_task(task_id)
