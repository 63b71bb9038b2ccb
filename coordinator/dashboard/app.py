"""The dashboard's ASGI app (starlette): read-only pages over one
:class:`~coordinator.rounds.service.CoordinatorService`.

=========================================  ====================================================
route                                      what
=========================================  ====================================================
``GET /``                                  the tasks, newest first, with their state
``GET /tasks/{id}``                        one task: timeline, funnel, curves, ε, model versions
``GET /tasks/{id}/snapshot.json``          the task's snapshot as JSON
``GET /tasks/{id}/stream``                 Server-Sent Events: ``snapshot`` (summary, panels'
                                           HTML, data) when the task changes; ``end`` when
                                           it is final
``GET /tasks/{id}/models/{v}.safetensors`` model version ``v``, streamed from the blob store
``GET /static/...``                        the page's script and style sheet (no build step)
=========================================  ====================================================

Thread-safety: the service is not thread-safe, so the handlers call it directly and must run
on the coordinator's event loop (serve this app with uvicorn on that loop, as
:class:`coordinator.http.HttpServer` does). What they call is short reads: a task's view and
its round records, taken into one :class:`Snapshots` entry per task that every page and
stream shares, rebuilt when the task emitted an event or (an open round's state changes emit
none) after :data:`REFRESH_S`, and never so often that rebuilding takes more than
:data:`LOOP_SHARE` of the loop. Model files are read on starlette's thread pool: that touches
the blob files only, never the service's state.

Live updates: a stream waits on :class:`~coordinator.dashboard.feed.DashboardFeed` (the event
sink ``dashboard_app`` adds to ``service.events``), waits :data:`COALESCE_S` more so a burst of
events is sent once, and sends the task's snapshot when it differs from the last one sent: the
summary fields as text, each panel's HTML (rendered and escaped here) and the data as JSON. The
page's script (``static/dashboard.js``) swaps the panels in and sets the fields with
``textContent``. The stream ends after the snapshot of a finished task, or when the hub closes.

No authentication: everything shown here, models included, is readable by whoever reaches
the port. Bind it where only operators can (see ``model_downloads``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from coordinator.dashboard import render
from coordinator.dashboard.auth import Authenticate, ViewerAuth
from coordinator.dashboard.feed import DashboardFeed
from coordinator.dashboard.snapshot import TaskSnapshot, task_snapshot
from coordinator.rounds.errors import NotFound
from coordinator.rounds.service import CoordinatorService
from coordinator.rounds.tasks import TaskView

#: Longest an open round's state may be stale on the page (state changes inside a round
#: emit no event), in seconds.
REFRESH_S = 1.0
#: Events closer together than this are sent as one snapshot, in seconds.
COALESCE_S = 0.2
#: A comment line keeps idle streams open through proxies, in seconds.
KEEPALIVE_S = 15.0
#: Bytes per chunk of a model download.
MODEL_CHUNK_BYTES = 1 << 20
#: Tasks whose last snapshot is kept.
CACHED_TASKS = 64
#: At most this share of the loop's time goes to rebuilding one task's snapshot.
LOOP_SHARE = 0.05
#: ... but a snapshot is never older than this (seconds) when the task emitted since.
MAX_THROTTLE_S = 5.0

STATIC_DIR = Path(__file__).with_name("static")

#: No inline script or style, nothing from elsewhere: markup that slipped through escaping
#: still cannot run.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class _Built:
    at: float
    #: Seconds the build took (on the loop).
    cost_s: float
    view: TaskView
    snapshot: TaskSnapshot
    #: The live message of this snapshot, by ``model_downloads`` (rendered once, sent to
    #: every stream).
    messages: dict[bool, str] = field(default_factory=dict)


class Snapshots:
    """Each task's latest snapshot, shared by every page and stream of the task. Rebuilt
    when the feed saw a newer event, or (while the task runs) when it is older than
    ``max_age_s``; never more often than :data:`LOOP_SHARE` of the loop's time allows (a
    build that took 10 ms waits 200 ms before the next). Call on the service's loop."""

    def __init__(self, service: CoordinatorService, feed: DashboardFeed, *,
                 max_age_s: float = REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._service = service
        self._feed = feed
        self._max_age_s = max_age_s
        self._clock = clock
        self._cache: OrderedDict[str, _Built] = OrderedDict()

    def get(self, task_id: str) -> TaskSnapshot:
        """Raises NotFound for an unknown task."""
        return self._built(task_id).snapshot

    def message(self, task_id: str, *, model_downloads: bool = True) -> tuple[TaskSnapshot, str]:
        """The snapshot and its live message (:func:`render.live_message`)."""
        built = self._built(task_id)
        message = built.messages.get(model_downloads)
        if message is None:
            message = built.messages[model_downloads] = render.live_message(
                built.snapshot, model_downloads=model_downloads)
        return built.snapshot, message

    def _built(self, task_id: str) -> _Built:
        seq = self._feed.last_seq(task_id)
        now = self._clock()
        cached = self._cache.get(task_id)
        if cached is not None:
            self._cache.move_to_end(task_id)
            age = now - cached.at
            fresh = cached.snapshot.seq == seq and (cached.snapshot.is_final
                                                    or age < self._max_age_s)
            if fresh or age < min(cached.cost_s / LOOP_SHARE, MAX_THROTTLE_S):
                return cached
        started = time.perf_counter()
        # The view carries epsilon (an accountant's computation): taken again only when
        # the task emitted since; an open round's state needs the rounds alone.
        view = (cached.view if cached is not None and cached.snapshot.seq == seq
                else self._service.get_task(task_id))
        rounds = self._service.list_rounds(task_id)
        snap = task_snapshot(view, rounds, self._feed.activity(task_id), seq=seq)
        built = self._cache[task_id] = _Built(now, time.perf_counter() - started, view, snap)
        while len(self._cache) > CACHED_TASKS:
            self._cache.popitem(last=False)
        return built


def _html(markup: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(markup, status_code=status_code, headers=SECURITY_HEADERS)


def _filename(task_id: str, version: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task_id)}-v{version}.safetensors"


def dashboard_app(service: CoordinatorService, *, feed: DashboardFeed | None = None,
                  model_downloads: bool = True,
                  authenticate: Authenticate | None = None) -> ASGIApp:
    """The dashboard for ``service``; subscribes its feed to ``service.events``. Mount it
    last (at ``/``) in the HTTP port's app, served on the coordinator's event loop.
    ``model_downloads=False`` leaves the model links and route out. ``authenticate``: the
    admin API's credential check (:mod:`.auth`: every page needs a token); None serves it
    to anyone (tests of the pages themselves)."""
    if feed is None:
        feed = DashboardFeed()
        service.events.add_sink(feed)
    snapshots = Snapshots(service, feed)

    async def tasks(request: Request) -> Response:
        return _html(render.tasks_page(service.list_tasks()))

    async def task(request: Request) -> Response:
        snap = snapshots.get(request.path_params["task_id"])
        return _html(render.task_page(snap, model_downloads=model_downloads))

    async def snapshot_json(request: Request) -> Response:
        snap = snapshots.get(request.path_params["task_id"])
        return JSONResponse(snap.to_json(), headers={"Cache-Control": "no-store"})

    async def stream(request: Request) -> Response:
        task_id = request.path_params["task_id"]
        snapshots.get(task_id)  # 404 before the stream starts

        async def messages() -> AsyncIterator[str]:
            with feed.watch(task_id) as changed:
                last = ""
                last_sent = time.monotonic()
                while not feed.closed:
                    changed.clear()
                    snap, message = snapshots.message(task_id,
                                                      model_downloads=model_downloads)
                    if message != last:
                        yield f"event: snapshot\nid: {snap.seq}\ndata: {message}\n\n"
                        last, last_sent = message, time.monotonic()
                    if snap.is_final:
                        yield "event: end\ndata: {}\n\n"
                        return
                    if time.monotonic() - last_sent > KEEPALIVE_S:
                        yield ": keepalive\n\n"
                        last_sent = time.monotonic()
                    try:
                        await asyncio.wait_for(changed.wait(), timeout=REFRESH_S)
                        await asyncio.sleep(COALESCE_S)
                    except TimeoutError:
                        pass

        return StreamingResponse(messages(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    async def model(request: Request) -> Response:
        if not model_downloads:
            raise HTTPException(404, "model downloads are turned off on this coordinator")
        task_id = request.path_params["task_id"]
        version = int(request.path_params["version"])
        record = service.model_version(task_id, version)
        # A plain iterator: starlette reads it on its thread pool (blob files only).
        chunks = service.model_chunks(record, MODEL_CHUNK_BYTES)
        return StreamingResponse(chunks, media_type="application/octet-stream", headers={
            "Content-Disposition": f'attachment; filename="{_filename(task_id, version)}"',
            "Content-Length": str(record.size_bytes),
            "X-Content-SHA256": record.sha256,
            "X-Content-Type-Options": "nosniff"})

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.endswith((".json", "/stream")):
            return JSONResponse({"error": str(exc)}, status_code=404)
        return _html(render.not_found_page(str(exc)), 404)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _html(render.error_page(exc.status_code, exc.detail), exc.status_code)

    app = Starlette(
        routes=[
            Route("/", tasks),
            Route("/tasks/{task_id}", task),
            Route("/tasks/{task_id}/snapshot.json", snapshot_json),
            Route("/tasks/{task_id}/stream", stream),
            Route("/tasks/{task_id}/models/{version:int}.safetensors", model),
            Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        exception_handlers={NotFound: not_found, HTTPException: http_error},
    )
    return app if authenticate is None else ViewerAuth(app, authenticate)


__all__ = ["COALESCE_S", "LOOP_SHARE", "REFRESH_S", "SECURITY_HEADERS", "Snapshots",
           "dashboard_app"]
