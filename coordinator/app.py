"""Composition root: settings -> stores -> service -> gRPC server (grpc.aio).

``serve()`` runs until SIGINT/SIGTERM; ``EmbeddedCoordinator`` runs the same server on a
background thread for `fedctl demo` and tests.

With ``settings.replica`` the coordinator is one replica of several on one database
(:mod:`coordinator.replication`): it starts as a standby (admin reads served, devices and
task changes refused UNAVAILABLE, the model store untouched) and, once it holds the leader
lease, takes the model store, fences its writes with the lease's epoch, recovers the
running tasks and runs their rounds. Losing the lease ends the process
(:class:`LeadershipLost` out of :func:`serve`, within ``ABANDON_EXIT_S`` of the loss): a
supervisor starts it again as a standby. A replica that was elected but could not take over
(recovery failed, the model store stayed locked) releases the lease and exits with status 3
(:class:`PromotionFailed`): a supervisor should count it as a failed start.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import signal
import sys
import threading
from collections.abc import Callable
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
from coordinator.replication import LEASE_NAME, PROMOTION_FAILED_EXIT, Leadership, Role
from coordinator.rounds.clock import SystemClock
from coordinator.rounds.service import CoordinatorService
from coordinator.security.service import Security
from coordinator.settings import CoordinatorSettings
from coordinator.storage import FileBlobStore, SqlStore, open_security_store, open_store
from coordinator.storage.errors import BlobError
from coordinator.storage.event_log import EventLog, open_event_log
from coordinator.storage.leases import Fence, LeaseRecord
from coordinator.transport import handlers
from coordinator.transport.admin_auth import AdminAuthInterceptor
from coordinator.transport.admin_servicer import AdminServicer
from coordinator.transport.device_auth import DeviceAuthInterceptor
from coordinator.transport.device_servicer import DeviceServicer
from coordinator.transport.health import Health
from coordinator.transport.shard_client import GrpcShardPool
from coordinator.transport.standby import StandbyGate
from coordinator.transport.tls import bind, is_loopback, server_credentials

log = logging.getLogger(__name__)

#: How often deadlines and selection windows are checked.
TICK_SECONDS = 0.05
#: A replica that lost its leadership exits within this long, whatever its threads do
#: (counted from the loss, not from the end of its shutdown).
ABANDON_EXIT_S = 10.0
#: How long a newly elected replica waits for the model store's lock (held by a deposed
#: leader on this machine that has not stopped yet) before it gives up leading: well past
#: ABANDON_EXIT_S (the deposed leader loses its lease about when this one takes it).
STORE_LOCK_WAIT_S = 3 * ABANDON_EXIT_S


class LeadershipLost(Exception):
    """This replica held the leader lease and lost it (another replica leads now): it
    stopped serving; the message says why. ``exit_code``: what the process exits with."""

    exit_code = 1


class PromotionFailed(LeadershipLost):
    """This replica was elected but could not take over (the model store stayed locked, or
    recovering the tasks failed): it stopped and released the lease. Its exit status
    (:data:`PROMOTION_FAILED_EXIT`) tells a supervisor to count it as a failed start, not to
    start it again for ever (every replica would take the lease and fail in turn)."""

    exit_code = PROMOTION_FAILED_EXIT


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
        if config.replica is not None:
            if not isinstance(self.store, SqlStore):
                self.store.close()
                raise OSError("replicas share one database: a replica needs --db "
                              "sqlite:///FILE or postgresql://..., not memory://")
            # Until elected, no write of tasks, rounds or versions can pass (no lease has
            # epoch 0): a standby's bug cannot touch the leader's rounds.
            self.store.fence(Fence(LEASE_NAME, 0))
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
        event_log = self._event_log = open_event_log(self.store)
        self._resume_event_numbering(event_log)
        self.event_store = StoreSink(event_log)
        self.events.add_sink(self.event_store)
        clock = SystemClock()
        #: This coordinator's Prometheus registry (``/metrics`` on the HTTP side port).
        self.metrics = CollectorRegistry()
        shards = GrpcShardPool(config.shards) if config.shards is not None else None
        self.service = CoordinatorService(TimedStore(self.store, self.metrics), self.blobs,
                                          clock, rng=rng, settings=config, events=self.events,
                                          shards=shards)
        self.events.add_sink(PrometheusSink(self.metrics, now=clock.now))
        self.metrics.register(TaskCollector(self.service, self.store, self.events))
        self.readiness = Readiness(store_probe(self.store), standby=self.standby_reason)
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
        #: Replicas: the campaign for the leader lease (None: the only coordinator).
        self.leadership: Leadership | None = None
        #: Whether this process runs the rounds (from the start without replicas).
        self.leading = config.replica is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lost: asyncio.Event | None = None
        self._promotion: asyncio.Task[None] | None = None
        self._health_change: asyncio.Future[None] | None = None
        self.lost_reason = ""
        #: Whether the leadership ended because this replica could not take over.
        self.promotion_failed = False
        self._exit_after: tuple[float, Callable[[int], object]] | None = None
        self._exit_timer: threading.Timer | None = None
        self._exit_lock = threading.Lock()
        self._stopping = False

    def _resume_event_numbering(self, event_log: EventLog) -> None:
        # Every task's event numbering goes on after what is stored, before recovery emits
        # anything (a new leader: after what the previous one stored).
        for task in self.store.list_tasks():
            self.events.resume(task.task_id, event_log.last_event_seq(task.task_id))

    def standby_reason(self) -> str | None:
        """None while this coordinator runs the rounds, else what a refused device or
        operator is told (a replica standing by, naming the leader if one is known)."""
        if self.leading:
            return None
        if self._stopping:
            return "this coordinator replica is stopping"
        leader = self.leadership.leader_address if self.leadership is not None else None
        if self.leadership is not None and self.leadership.role is Role.LEADER:
            return ("this coordinator replica was just elected and is taking over the "
                    "rounds: try again in a moment")
        if leader is None:
            return ("this coordinator is a standby replica and no leader is known yet "
                    "(an election is under way): try another coordinator address")
        return (f"this coordinator is a standby replica; the leader is at {leader}: "
                "try that address")

    async def start(self, *, campaign: bool = True) -> int:
        """Binds the port first: a coordinator that cannot serve must not touch the rounds of
        the database (recovery fails every open round). ``campaign=False``: a replica
        campaigns for the lease only once :meth:`campaign` is called (after work that would
        stall the process, which the lease's clock does not forgive)."""
        # Masked inputs of secure aggregation arrive whole: room for 8M ring elements.
        limit = max(self.config.max_chunk_bytes + (256 << 10), 64 << 20)
        self._loop = asyncio.get_running_loop()
        self._lost = asyncio.Event()
        self.server = grpc.aio.server(
            interceptors=[StandbyGate(self.standby_reason),
                          AdminAuthInterceptor(self.security),
                          DeviceAuthInterceptor(self.security)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                # Calls the event loop has not taken yet wait in gRPC's queue instead of
                # being cancelled (gRPC's default: at random past 1,000, all past 3,000): a device
                # then waits for its answer (a paced "come back after") instead of retrying in a
                # storm that never ends (issue 17: 170,000 such at 10,000 devices).
                ("grpc.server.max_pending_requests", 1 << 14),
                ("grpc.server.max_pending_requests_hard_limit", 1 << 14),
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
        self.port = bind(self.server, f"{self.config.host}:{self.config.port}",
                         self._credentials)
        if self.http_app is not None:
            self.http = HttpServer(self.http_app, self.config.host, self.config.http_port or 0)
            self.http_port = self.http.bind()
        if self.config.replica is None:
            self.blobs.lock()
        self.service.warm_up()
        if self.config.replica is None:
            self.service.recover()
        await self.server.start()
        if self.leading:
            await self._health.serving()
        else:  # a standby replica: admin reads only, no devices
            await self._health.standing_by()
        if self.http is not None:
            await self.http.start()
            log.info("HTTP side port on %s:%d", self.config.host, self.http_port)
        if self.config.replica is None:
            self._ticker = asyncio.create_task(self._tick_forever())
        elif campaign:
            self.campaign()
        log.info("coordinator listening on %s:%d (%s)", self.config.host, self.port,
                 self.transport_security)
        return self.port

    # -- replicas ----------------------------------------------------------------------

    def campaign(self) -> None:
        """A replica campaigns for the leader lease from now on (:meth:`start` calls it
        unless told not to)."""
        replica = self.config.replica
        assert replica is not None and isinstance(self.store, SqlStore)
        loop = self._loop
        assert loop is not None
        address = replica.advertise_address or f"{self.config.host}:{self.port}"

        def elected(lease: LeaseRecord) -> None:
            def promote() -> None:
                self._promotion = loop.create_task(self._promote(lease))

            loop.call_soon_threadsafe(promote)

        def lost(reason: str) -> None:
            self._arm_exit(reason, code=1)  # now: the event loop may be what stalls
            loop.call_soon_threadsafe(self._leadership_lost, reason)

        self.leadership = Leadership(self.store.leases(wait_s=replica.lease_ttl_s / 3),
                                     address=address,
                                     on_elected=elected, on_lost=lost,
                                     ttl_s=replica.lease_ttl_s)
        log.info("coordinator replica %s: standing by for the leader lease (ttl %.1f s)",
                 address, replica.lease_ttl_s)
        self.leadership.start()

    async def _promote(self, lease: LeaseRecord) -> None:
        """Takes over the rounds once elected: the model store (whose lock a deposed leader
        on this machine may still hold for a moment), fenced writes, then recovery."""
        assert isinstance(self.store, SqlStore) and self.leadership is not None
        deadline = asyncio.get_running_loop().time() + STORE_LOCK_WAIT_S
        while True:
            if self.leadership.role is not Role.LEADER or self._stopping:
                return  # lost or stopping meanwhile
            try:
                self.blobs.lock()
                break
            except BlobError as exc:
                if asyncio.get_running_loop().time() > deadline:
                    self._leadership_lost(f"elected, but the model store stayed locked for "
                                          f"{STORE_LOCK_WAIT_S:g} s: {exc}",
                                          promotion_failed=True)
                    return
                await asyncio.sleep(0.1)
        fence = self.leadership.fence
        if fence is None or self._stopping:
            self.blobs.unlock()
            return
        self.store.fence(fence)
        try:
            self._resume_event_numbering(self._event_log)
            self.service.recover()
        except Exception as exc:  # noqa: BLE001 - a replica that cannot recover must not lead
            log.exception("recovery after the election failed")
            self._leadership_lost(f"elected, but recovering the tasks failed: {exc}",
                                  promotion_failed=True)
            return
        self.leading = True
        self._ticker = asyncio.create_task(self._tick_forever())
        if self._health is not None:
            await self._health.serving()
        print(f"fedcoord coordinator leads (lease epoch {lease.epoch}) on "
              f"{self.leadership.address}", flush=True)
        log.warning("leading: lease epoch %d; tasks recovered", lease.epoch)

    def exit_when_lost(self, after_s: float,
                       exit_process: Callable[[int], object] = os._exit) -> None:
        """Once this replica loses its leadership (or fails to take over), the process
        ends within ``after_s`` whatever its threads do (:func:`serve`): the model store's
        lock passes on only when it exits. ``exit_process`` is called with the exit
        status."""
        self._exit_after = (after_s, exit_process)

    def _arm_exit(self, reason: str, *, code: int) -> None:
        """Starts the exit watchdog of :meth:`exit_when_lost` (once; any thread)."""
        with self._exit_lock:
            if self._exit_after is None or self._exit_timer is not None:
                return
            after_s, exit_process = self._exit_after

            def exit_now() -> None:
                print(f"fedctl: error: coordinator: this replica stopped leading: {reason} "
                      f"(and had not stopped {after_s:g} s later)", file=sys.stderr,
                      flush=True)
                exit_process(code)

            self._exit_timer = threading.Timer(after_s, exit_now)
            self._exit_timer.daemon = True
            self._exit_timer.start()

    def _leadership_lost(self, reason: str, *, promotion_failed: bool = False) -> None:
        """On the event loop: stop running rounds at once; :func:`serve` ends the process."""
        if self._stopping or self.lost_reason:
            return
        self._arm_exit(reason, code=PROMOTION_FAILED_EXIT if promotion_failed else 1)
        self.leading = False
        self.lost_reason = reason
        self.promotion_failed = promotion_failed
        if self._ticker is not None:
            self._ticker.cancel()
        if self._health is not None:
            self._health_change = asyncio.ensure_future(self._health.standing_by())
        if self._lost is not None:
            self._lost.set()

    async def wait_lost(self) -> str:
        """Returns (the reason) once this replica has lost its leadership; never without
        replicas."""
        assert self._lost is not None, "start() first"
        await self._lost.wait()
        return self.lost_reason

    async def abandon(self) -> None:
        """Stops serving at once, without the writes a graceful stop makes (this replica
        leads no more: the new leader owns the rounds). The model store stays locked until
        the process exits: a commit still running on the worker thread may be writing a
        model file, which must land before the next leader writes that path (its own
        record of the commit is fenced)."""
        await self._halt(0)
        self.events.close()
        if self.leadership is not None:
            # A no-op when another replica holds the lease; else (this one gave up, e.g.
            # the store stayed locked) the next replica need not wait for the expiry.
            self.leadership.stop(release=True)
        self.store.close()

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

    async def _halt(self, grace: float) -> None:
        """Stops serving: not ready, NOT_SERVING, no HTTP, no rounds ticking, the gRPC
        server stopped (``grace``: seconds for the calls in flight)."""
        self._stopping = True
        self.readiness.shutting_down()
        if self._health is not None:
            await self._health.shutting_down()
        if self.http is not None:
            await self.http.stop()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.server is not None:
            await self.server.stop(grace)

    async def stop(self, grace: float = 2.0) -> None:
        await self._halt(grace)
        if self.leading:
            self.service.close()
        self.events.close()
        # A leader hands over at once: the model store first, then the lease.
        self.blobs.unlock()
        if self.leadership is not None:
            self.leadership.stop(release=True)
        self.store.close()


async def serve(config: CoordinatorSettings, port_file: Path | None = None, *,
                admin_token_file: Path | None = None) -> None:
    """Runs until SIGINT or SIGTERM, then stops gracefully. ``admin_token_file``: see
    :meth:`coordinator.security.service.Security.bootstrap_admin_token`."""
    coordinator = Coordinator(config)
    coordinator.exit_when_lost(ABANDON_EXIT_S)
    if admin_token_file is not None:
        try:
            if coordinator.security.bootstrap_admin_token(admin_token_file):
                log.warning("no admin token existed: the first one is in %s", admin_token_file)
        except ValueError as exc:
            coordinator.store.close()
            raise OSError(str(exc)) from None
    port = await coordinator.start(campaign=False)
    # A serving process: every object of the start-up (torch's few hundred thousand among
    # them) leaves the cyclic collector's sight, and collections come less often; each full
    # one scanned them all on the event loop, again and again while thousands of calls
    # waited (0.1-0.9 s each at 10,000 devices, issue 17). Not in start(): tests embed it.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    if config.replica is not None:
        # After the collection: it holds the GIL long enough to cost a fresh leader the
        # lease it just took (its clock runs from the moment it asked for it).
        coordinator.campaign()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    role = " as a standby replica" if config.replica is not None else ""
    print(f"fedcoord coordinator listening on {config.host}:{port}{role} "
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
    stopped = asyncio.create_task(stop.wait())
    if coordinator.config.replica is None:
        await stopped
    else:
        lost = asyncio.create_task(coordinator.wait_lost())
        await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            stopped.cancel()
            # The exit watchdog runs since the loss (exit_when_lost): a worker thread stuck
            # past it, or a slow shutdown, cannot keep the next leader from the store.
            await coordinator.abandon()
            error = PromotionFailed if coordinator.promotion_failed else LeadershipLost
            raise error(f"this replica stopped leading: {lost.result()}")
        lost.cancel()
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
