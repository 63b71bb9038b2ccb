"""The coordinator's client of its aggregator shards (:class:`coordinator.rounds.shards.
ShardPool` over gRPC).

One background thread, started with the first round watched (a standby replica starts none),
polls every shard for the rounds being watched (``RoundProgress``, every
:data:`POLL_SECONDS`) and sends the drops the round machine asked for, so the event
loop never waits on a shard: it reads the last poll's answer. ``collect`` is the one blocking
call, made by the commit thread. Every call carries the shard key's admin token and a
deadline (``ShardSettings.call_timeout_s``); a shard whose last poll failed is not healthy,
and is assigned no new device until it answers again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import Any

import grpc

from coordinator.rounds.shards import ShardUnavailable
from coordinator.settings import ShardSettings
from core.shards import (
    ADMIN_METADATA,
    PartialSum,
    RoundKey,
    SignedTicket,
    UploadTicket,
    admin_token,
    derive_shard_key,
    sign_ticket,
)
from protos import convert
from protos.fedcoord.v1 import aggregator_pb2, aggregator_pb2_grpc

log = logging.getLogger(__name__)

#: How often the shards are asked for the progress of the watched rounds.
POLL_SECONDS = 0.25
#: Largest message on a shard channel (a collected sum streams in chunks of at most 1 MiB;
#: progress answers list device ids).
_MAX_MESSAGE = 64 << 20


class GrpcShardPool:
    def __init__(self, settings: ShardSettings) -> None:
        if not settings.addresses:
            raise ValueError("no aggregator shard address given")
        self._settings = settings
        #: Each shard's own key, derived from the master key: it signs that shard's tickets
        #: and authenticates the calls to it.
        self._keys = [derive_shard_key(settings.key, i) for i in range(len(settings.addresses))]
        self._metadata = [((ADMIN_METADATA, admin_token(key)),) for key in self._keys]
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE),
                   ("grpc.max_send_message_length", _MAX_MESSAGE),
                   ("grpc.enable_retries", 0)]
        if settings.tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=settings.tls_ca.read_bytes())
            self._channels = [grpc.secure_channel(a, credentials, options=options)
                              for a in settings.addresses]
        else:
            self._channels = [grpc.insecure_channel(a, options=options)
                              for a in settings.addresses]
        self._stubs = [aggregator_pb2_grpc.AggregatorServiceStub(c) for c in self._channels]
        self._lock = threading.Lock()
        self._watched: set[RoundKey] = set()
        self._reported: dict[RoundKey, dict[int, frozenset[str]]] = {}
        self._healthy = [True] * len(settings.addresses)
        self._drops: list[RoundKey] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Started by the first round watched: a standby replica never polls.
        self._thread = threading.Thread(target=self._run, name="shard-poller", daemon=True)

    # ------------------------------------------------------------------ ShardPool

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._settings.addresses

    def sign(self, ticket: UploadTicket) -> SignedTicket:
        return sign_ticket(ticket, self._keys[ticket.shard])

    def healthy(self) -> list[int]:
        with self._lock:
            return [i for i, ok in enumerate(self._healthy) if ok]

    def watch(self, key: RoundKey) -> None:
        with self._lock:
            self._watched.add(key)
            self._reported.setdefault(key, {})
            if self._thread.ident is None and not self._stop.is_set():
                self._thread.start()
        self._wake.set()

    def reported(self, key: RoundKey) -> Mapping[int, frozenset[str]]:
        with self._lock:
            return dict(self._reported.get(key, {}))

    def collect(self, key: RoundKey, shard: int, size: int) -> PartialSum | None:
        request = aggregator_pb2.CollectRoundRequest(round=convert.round_key_to_proto(key))
        header = None
        data = bytearray()
        filled = 0
        try:
            for message in self._stubs[shard].CollectRound(
                    request, timeout=self._settings.collect_timeout_s,
                    metadata=self._metadata[shard]):
                if message.HasField("header"):
                    header = message.header
                    if header.values != size:  # checked before anything is allocated
                        raise ShardUnavailable(f"its partial sum has {header.values} values; "
                                               f"the model has {size}")
                    # One buffer of the sum's size, filled in place (no list of chunks).
                    data = bytearray(8 * size)
                    filled = 0
                elif header is not None and filled + len(message.chunk) <= len(data):
                    data[filled:filled + len(message.chunk)] = message.chunk
                    filled += len(message.chunk)
                else:
                    raise ShardUnavailable("CollectRound sent more than its header declared")
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ShardUnavailable(f"{exc.code().name}: {exc.details()}") from None
        if header is None:
            raise ShardUnavailable("CollectRound sent no header")
        if filled != len(data):
            raise ShardUnavailable(f"CollectRound sent {filled} of {len(data)} bytes")
        try:
            part: PartialSum = convert.partial_sum_from_proto(header, data)
        except convert.WireFormatError as exc:
            raise ShardUnavailable(str(exc)) from None
        if convert.round_key_from_proto(header.round) != key:
            raise ShardUnavailable("CollectRound answered for another round")
        return part

    def forget(self, key: RoundKey) -> None:
        with self._lock:
            self._watched.discard(key)
            self._reported.pop(key, None)
            self._drops.append(key)
        self._wake.set()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for channel in self._channels:
            channel.close()

    # ------------------------------------------------------------------ the poller

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad poll
                log.exception("polling the aggregator shards failed; polling again")
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _poll_once(self) -> None:
        """Asks every shard for the watched rounds' progress, all at once, and takes each
        answer as it arrives (a shard that hangs delays only its own), then sends the drops
        asked for since the last poll. What a shard was seen to accept is kept: a shard
        that restarted and forgot some devices cannot make the coordinator forget them
        (its partial sum must name them all, :meth:`ShardedAggregator._problem
        <coordinator.rounds.shards.ShardedAggregator._problem>`)."""
        with self._lock:
            watched = sorted(self._watched)
            drops, self._drops = self._drops, []
        request = aggregator_pb2.RoundProgressRequest(
            rounds=[convert.round_key_to_proto(k) for k in watched])
        timeout = min(self._settings.call_timeout_s, 5.0)
        futures = []
        for shard, stub in enumerate(self._stubs):
            future = stub.RoundProgress.future(request, timeout=timeout,
                                               metadata=self._metadata[shard])
            future.add_done_callback(lambda f, shard=shard: self._take_progress(shard, f))
            futures.append(future)
        for future in futures:
            with contextlib.suppress(grpc.RpcError, grpc.FutureCancelledError):
                future.result()
        healthy = self.healthy()
        pending = [stub.DropRound.future(aggregator_pb2.DropRoundRequest(
                       round=convert.round_key_to_proto(key)), timeout=timeout,
                       metadata=self._metadata[shard])
                   for key in drops for shard, stub in enumerate(self._stubs)
                   if shard in healthy]
        for future in pending:
            try:
                future.result()
            except grpc.RpcError:
                pass  # a shard forgets unclaimed rounds on its own after their deadline

    def _take_progress(self, shard: int, future: Any) -> None:
        """One shard's answer to a poll (on gRPC's thread, as soon as it arrives)."""
        try:
            answer = future.result()
        except grpc.RpcError as exc:
            self._set_health(shard, False, f"{exc.code().name}: {exc.details()}")
            return
        except grpc.FutureCancelledError:
            return
        self._set_health(shard, True, "")
        with self._lock:
            for progress in answer.rounds:
                key = convert.round_key_from_proto(progress.round)
                if key in self._watched:
                    seen = self._reported[key].get(shard, frozenset())
                    self._reported[key][shard] = seen | frozenset(progress.reported)

    def _set_health(self, shard: int, ok: bool, why: str) -> None:
        with self._lock:
            was = self._healthy[shard]
            self._healthy[shard] = ok
        if was != ok:
            address = self._settings.addresses[shard]
            if ok:
                log.info("aggregator shard %d (%s) answers again", shard, address)
            else:
                log.warning("aggregator shard %d (%s) does not answer: %s", shard, address, why)


__all__ = ["POLL_SECONDS", "GrpcShardPool"]
