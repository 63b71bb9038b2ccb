"""Composition root of an aggregator shard (``fedctl aggregator serve``, issue 17):
settings -> :class:`~coordinator.aggregator_shard.ShardState` -> AggregatorService on a
grpc.aio server, with gRPC health and a periodic expiry of forgotten rounds.

``serve_aggregator()`` runs until SIGINT/SIGTERM, then stops gracefully (health
NOT_SERVING, calls in flight given a grace period); ``EmbeddedAggregator`` runs the same
server on a background thread for tests. The shard keeps nothing on disk but the spool
files of uploads in flight: a restarted shard has lost its rounds, which the coordinator
counts as the shard's group lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.aggregator_shard import ShardState
from coordinator.rounds.clock import Clock, SystemClock
from coordinator.transport.aggregator_servicer import (
    AggregatorServicer,
    add_aggregator_servicer,
)
from coordinator.transport.handlers import HEADER_BYTES
from coordinator.transport.tls import bind, is_loopback
from core.shards import KEY_BYTES
from core.tls import TlsError, load_server_tls
from protos.fedcoord.v1 import aggregator_pb2

log = logging.getLogger(__name__)

#: Largest answer a shard sends: the coordinator's limit on what it receives from a shard
#: (coordinator.transport.shard_client); about a million device ids of 40 characters.
SEND_LIMIT_BYTES = 64 << 20

AGGREGATOR_SERVICE = aggregator_pb2.DESCRIPTOR.services_by_name["AggregatorService"].full_name
#: How often rounds past their retention are forgotten.
EXPIRE_EVERY_S = 30.0
#: ``fedctl aggregator serve --port``'s default.
DEFAULT_PORT = 7071


@dataclass(frozen=True)
class AggregatorSettings:
    """One shard's settings (``fedctl aggregator serve``'s flags)."""

    #: This shard's place in the coordinator's ``--aggregator`` list; tickets name it.
    index: int
    #: The key shared with the coordinator (:data:`core.shards.KEY_BYTES` bytes).
    key: bytes
    #: Where uploads in flight are spooled (one file each, removed once answered).
    spool_dir: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    #: ``server.crt`` and ``server.key`` (None: plaintext, loopback only unless
    #: ``insecure``), as the coordinator's ``--tls``.
    tls_dir: Path | None = None
    insecure: bool = False
    #: Largest request message: an upload's chunk (the coordinator's ``max_chunk_bytes``,
    #: which each ticket carries) plus its header. Also the largest collected chunk sent.
    max_message_bytes: int = (4 << 20) + HEADER_BYTES
    #: An upload stream silent for this long is dropped.
    upload_idle_timeout_s: float = 30.0


def server_credentials(settings: AggregatorSettings) -> grpc.ServerCredentials | None:
    """The credentials to bind with, or None for plaintext (logged as a warning).

    Raises :class:`~core.tls.TlsError` for a missing or malformed file, or plaintext on an
    address that is not loopback without ``insecure``."""
    if settings.tls_dir is None:
        if not is_loopback(settings.host) and not settings.insecure:
            raise TlsError(
                f"refusing to serve plaintext on {settings.host}, which is not a loopback "
                "address: devices' updates would cross the network unencrypted. Give "
                "--tls-dir DIR (see `fedctl certs init`), or --insecure if this network is "
                "trusted")
        log.warning("serving WITHOUT TLS on %s%s: traffic is plaintext", settings.host,
                    " (--insecure)" if settings.insecure else " (loopback only)")
        return None
    if settings.insecure:
        raise TlsError("--insecure and --tls-dir contradict each other: give one")
    tls = load_server_tls(settings.tls_dir)
    return grpc.ssl_server_credentials([(tls.key_pem, tls.cert_chain_pem)])


class AggregatorShard:
    """A running shard: its state and its gRPC server, on one event loop."""

    def __init__(self, settings: AggregatorSettings, clock: Clock | None = None) -> None:
        """Raises ValueError for a bad index or key, :class:`~core.tls.TlsError` for bad TLS
        settings, OSError when the spool folder cannot be made."""
        if settings.index < 0:
            raise ValueError(f"the shard index is 0 or more, got {settings.index}")
        if len(settings.key) != KEY_BYTES:
            raise ValueError(f"a shard key is {KEY_BYTES} bytes, got {len(settings.key)}")
        self.settings = settings
        self._credentials = server_credentials(settings)
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        # Spool files of a previous run belong to uploads that were never answered.
        for stale in settings.spool_dir.glob("*.upd"):
            stale.unlink(missing_ok=True)
        self._clock = clock or SystemClock()
        self.state = ShardState(index=settings.index, key=settings.key,
                                spool_dir=settings.spool_dir, clock=self._clock)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self._health: health_aio.HealthServicer | None = None
        self._expiry: asyncio.Task[None] | None = None

    @property
    def transport_security(self) -> str:
        return "plaintext" if self._credentials is None else "TLS"

    async def start(self) -> int:
        """Binds and starts serving; returns the bound port. Raises OSError when the address
        cannot be bound."""
        limit = self.settings.max_message_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            # Answers to the coordinator list devices (RoundProgress, CollectRound's
            # header): a round of a few thousand long ids passes the upload limit.
            ("grpc.max_send_message_length", SEND_LIMIT_BYTES),
            ("grpc.so_reuseport", 0),
        ])
        servicer = AggregatorServicer(self.state, self.settings.key,
                                      idle_timeout_s=self.settings.upload_idle_timeout_s,
                                      max_message_bytes=limit)
        add_aggregator_servicer(servicer, self.server, upload_message_bytes=limit)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        self.port = bind(self.server, f"{self.settings.host}:{self.settings.port}",
                         self._credentials)
        await self.server.start()
        for service in ("", AGGREGATOR_SERVICE):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._expiry = asyncio.create_task(self._expire_forever())
        log.info("aggregator shard %d listening on %s:%d (%s)", self.settings.index,
                 self.settings.host, self.port, self.transport_security)
        return self.port

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            for key in self.state.expire(self._clock.now()):
                log.info("forgot round %d of task %s (past its deadline)", key.round_id,
                         key.task_id)

    async def stop(self, grace: float = 2.0) -> None:
        """NOT_SERVING, then the server stops (``grace``: seconds for the calls in flight)."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._expiry is not None:
            self._expiry.cancel()
        if self.server is not None:
            await self.server.stop(grace)


async def serve_aggregator(settings: AggregatorSettings, port_file: Path | None = None) -> None:
    """Runs a shard until SIGINT or SIGTERM, then stops it gracefully. ``port_file``: the
    bound port is written there once the shard serves (port 0 picks a free one)."""
    shard = AggregatorShard(settings)
    port = await shard.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fedcoord aggregator shard {settings.index} listening on {settings.host}:{port} "
          f"({shard.transport_security})", flush=True)
    # Last: whoever waits for the port file may signal at once.
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    await stop.wait()
    await shard.stop()


class EmbeddedAggregator:
    """A shard on a background thread with its own event loop (tests)."""

    def __init__(self, settings: AggregatorSettings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.port = 0
        self._clock = clock
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"fedcoord-aggregator-{settings.index}")
        self._shard: AggregatorShard | None = None

    @property
    def state(self) -> ShardState:
        if self._shard is None:
            raise RuntimeError("the shard has not started")
        return self._shard.state

    def start(self) -> int:
        self._thread.start()

        async def _start() -> int:
            self._shard = AggregatorShard(self.settings, self._clock)
            return await self._shard.start()

        self.port = asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout=60)
        return self.port

    def stop(self) -> None:
        if self._shard is not None:
            asyncio.run_coroutine_threadsafe(self._shard.stop(0.5), self._loop).result(
                timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> EmbeddedAggregator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
