"""The HTTP side port's application: ``/healthz``, ``/readyz``, ``/metrics``, and whatever
else is mounted on it later (a dashboard): :func:`create_app` returns a Starlette app, to
which routes are added with ``app.add_route(path, endpoint)`` and sub-applications with
``app.mount(path, other_app)``, before or after the server starts.

Nothing served here is secret: probe verdicts and aggregate counters labelled by task,
reason, outcome, state or store operation (never a device id). The port is plaintext and
unauthenticated; keep it inside the cluster (it binds the coordinator's ``--host``).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from coordinator.http.readiness import Readiness


def create_app(*, registry: CollectorRegistry, readiness: Readiness,
               routes: Sequence[BaseRoute] = ()) -> Starlette:
    """The app, serving ``registry`` on ``/metrics`` and ``readiness`` on ``/readyz``.
    Endpoints run on the event loop that runs the server (the coordinator's): ``/metrics``
    reads the round service there, between RPCs."""

    async def healthz(request: Request) -> Response:
        # Liveness: answering at all is the signal (the loop that serves the devices is
        # the one that runs this).
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        verdict = await readiness.check()
        if verdict.ready:
            return PlainTextResponse("ready\n")
        return PlainTextResponse(f"not ready: {verdict.reason}\n", status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *routes,
    ])
