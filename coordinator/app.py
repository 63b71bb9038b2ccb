"""Composition root: settings -> stores -> service -> gRPC server (grpc.aio).

``serve()`` runs until SIGINT/SIGTERM; ``EmbeddedCoordinator`` runs the same server on a
background thread for `fedctl demo` and tests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import threading
from dataclasses import replace
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from coordinator.dashboard import dashboard_app
from coordinator.http import HttpServer, Readiness, create_app, store_probe
from coordinator.observability.events import EventHub
from coordinator.observability.metrics import (
    PrometheusSink,
    TaskCollector,
    TimedStore,
    TransferCollector,
)
from coordinator.observability.sinks import SinkConfigError, open_sinks
from coordinator.observability.store_sink import StoreSink
from coordinator.rounds.clock import SystemClock
from coordinator.rounds.service import CoordinatorService
from coordinator.security.service import Security
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, open_security_store, open_store
from coordinator.storage.event_log import open_event_log
from coordinator.transport import handlers
from coordinator.transport.admin_auth import AdminAuthInterceptor
from coordinator.transport.admin_servicer import AdminServicer
from coordinator.transport.device_auth import DeviceAuthInterceptor
from coordinator.transport.device_servicer import DeviceServicer
from coordinator.transport.health import Health
from coordinator.transport.tls import is_loopback, server_credentials

log = logging.getLogger(__name__)

#: How often deadlines and selection windows are checked.
TICK_SECONDS = 0.05


class Coordinator:
    """A running coordinator: the service plus its gRPC server, on one event loop."""

    def __init__(self, config: CoordinatorSettings) -> None:
        """Raises :class:`~core.tls.TlsError` for bad TLS files or a plaintext bind the
        settings do not allow, before the database or the store is touched."""
        self._credentials = server_credentials(config)
        if not config.security.authenticate_devices:
            if not is_loopback(config.host):
                raise OSError("device authentication can be turned off on a loopback address "
                              "only (it lets any client claim any device id)")
            log.warning("device authentication is OFF: check-ins are taken at their word "
                        "(for measuring its cost only)")
        # A server commits off the event loop: RPCs never wait on the optimizer or torch.
        config = replace(config, commit_in_background=True)
        self.config = config
        self.store = open_store(config.db_url)
        self.blobs = FileBlobStore(Path(config.store_dir))
        self.security = Security(open_security_store(self.store), config.security)
        rng = random.Random(config.seed) if config.seed is not None else random.SystemRandom()
        try:
            self.events = EventHub(open_sinks(config.event_sinks))
        except SinkConfigError:
            self.store.close()
            raise
        # Every event also goes to the database (`fedctl events`); each task's numbering
        # goes on after what is stored there, before recovery emits anything.
        event_log = open_event_log(self.store)
        for task in self.store.list_tasks():
            self.events.resume(task.task_id, event_log.last_event_seq(task.task_id))
        self.event_store = StoreSink(event_log)
        self.events.add_sink(self.event_store)
        clock = SystemClock()
        #: This coordinator's Prometheus registry (``/metrics`` on the HTTP side port).
        self.metrics = CollectorRegistry()
        self.service = CoordinatorService(TimedStore(self.store, self.metrics), self.blobs,
                                          clock, rng=rng, settings=config, events=self.events)
        self.events.add_sink(PrometheusSink(self.metrics, now=clock.now))
        self.metrics.register(TaskCollector(self.service, self.store, self.events))
        self.readiness = Readiness(store_probe(self.store))
        #: The HTTP side port's app (None: ``http_port`` off); routes may be added to it
        #: (``add_route``, ``mount``) before or after the start.
        self.http_app = (create_app(registry=self.metrics, readiness=self.readiness)
                         if config.http_port is not None else None)
        if self.http_app is not None:
            # Last: it takes every other path. Pages need an admin-API credential.
            self.http_app.mount("/", dashboard_app(
                self.service, authenticate=self.security.admin.authenticate))
        self.http: HttpServer | None = None
        self.http_port = 0
        self._health: Health | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds the port first: a coordinator that cannot serve must not touch the rounds of
        the database (recovery fails every open round)."""
        # Masked inputs of secure aggregation arrive whole: room for 8M ring elements.
        limit = max(self.config.max_chunk_bytes + (256 << 10), 64 << 20)
        self.server = grpc.aio.server(
            interceptors=[AdminAuthInterceptor(self.security),
                          DeviceAuthInterceptor(self.security)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        # Per-method request limits, checked before parsing (coordinator.transport.handlers).
        devices = DeviceServicer(self.service, self.security,
                                 idle_timeout_s=self.config.upload_idle_timeout_s)
        self.metrics.register(TransferCollector(devices))
        handlers.add_device_servicer(devices, self.server,
                                     handlers.RequestLimits(self.service, self.config))
        handlers.add_admin_servicer(AdminServicer(self.service, self.security, self.event_store),
                                    self.server,
                                    handlers.RequestLimits(self.service, self.config))
        self._health = Health(self.server)
        await self._health.not_serving()
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self._credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, self._credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (in use, or not an address of this host)")
        if self.http_app is not None:
            self.http = HttpServer(self.http_app, self.config.host, self.config.http_port or 0)
            self.http_port = self.http.bind()
        self.blobs.lock()
        self.service.warm_up()
        self.service.recover()
        await self.server.start()
        await self._health.serving()
        if self.http is not None:
            await self.http.start()
            log.info("HTTP side port on %s:%d", self.config.host, self.http_port)
        self._ticker = asyncio.create_task(self._tick_forever())
        log.info("coordinator listening on %s:%d (%s)", self.config.host, self.port,
                 self.transport_security)
        return self.port

    @property
    def transport_security(self) -> str:
        """``mutual TLS``, ``TLS`` or ``plaintext``, as the settings ask."""
        if self.config.tls_dir is None:
            return "plaintext"
        return "mutual TLS" if self.config.client_ca is not None else "TLS"

    async def _tick_forever(self) -> None:
        while True:
            try:
                self.service.tick()
            except Exception:
                log.exception("round tick failed")
            await asyncio.sleep(TICK_SECONDS)

    async def stop(self, grace: float = 2.0) -> None:
        self.readiness.shutting_down()
        if self._health is not None:
            await self._health.shutting_down()
        if self.http is not None:
            await self.http.stop()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.server is not None:
            await self.server.stop(grace)
        self.service.close()
        self.events.close()
        self.store.close()
        self.blobs.unlock()


async def serve(config: CoordinatorSettings, port_file: Path | None = None, *,
                admin_token_file: Path | None = None) -> None:
    """Runs until SIGINT or SIGTERM, then stops gracefully. ``admin_token_file``: see
    :meth:`coordinator.security.service.Security.bootstrap_admin_token`."""
    coordinator = Coordinator(config)
    if admin_token_file is not None:
        try:
            if coordinator.security.bootstrap_admin_token(admin_token_file):
                log.warning("no admin token existed: the first one is in %s", admin_token_file)
        except ValueError as exc:
            coordinator.store.close()
            raise OSError(str(exc)) from None
    port = await coordinator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fedcoord coordinator listening on {config.host}:{port} "
          f"({coordinator.transport_security})", flush=True)
    if coordinator.http is not None:
        print(f"fedcoord HTTP on http://{config.host}:{coordinator.http_port} "
              "(/healthz /readyz /metrics)", flush=True)
    # Last: whoever waits for the port file may signal at once, and must find the handlers
    # installed and the lines printed (a SIGTERM between the two killed it silently).
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    await stop.wait()
    await coordinator.stop()


class EmbeddedCoordinator:
    """The coordinator on a background thread with its own event loop."""

    def __init__(self, config: CoordinatorSettings) -> None:
        self.config = config
        self.port = 0
        #: The HTTP side port once started (0: ``config.http_port`` is None).
        self.http_port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fedcoord-coordinator")
        self._coordinator: Coordinator | None = None

    def start(self) -> int:
        self._thread.start()

        async def _start() -> int:
            self._coordinator = Coordinator(self.config)
            return await self._coordinator.start()

        self.port = asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout=60)
        assert self._coordinator is not None
        self.http_port = self._coordinator.http_port
        return self.port

    @property
    def security(self) -> Security:
        """The running coordinator's security layer (e.g. to issue the embedder a token)."""
        if self._coordinator is None:
            raise RuntimeError("the coordinator has not started")
        return self._coordinator.security

    def stop(self) -> None:
        if self._coordinator is not None:
            asyncio.run_coroutine_threadsafe(self._coordinator.stop(0.5), self._loop).result(
                timeout=30
            )
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedCoordinator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
