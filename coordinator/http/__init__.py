"""The coordinator's HTTP side port (``serve --http-port``): liveness, readiness and
Prometheus metrics, on the coordinator's own event loop; more routes can be mounted.

Public surface: :func:`create_app`, :class:`HttpServer`, :class:`Readiness`,
:class:`Verdict`, :func:`store_probe`.
"""

from coordinator.http.app import create_app
from coordinator.http.readiness import Readiness, Verdict, store_probe
from coordinator.http.server import HttpServer

__all__ = ["HttpServer", "Readiness", "Verdict", "create_app", "store_probe"]
