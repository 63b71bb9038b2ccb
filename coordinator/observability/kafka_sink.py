"""Events to a Kafka topic (``serve --events kafka://BROKER[,BROKER...]/TOPIC``).

Delivery is at least once and never holds up a round:

* :meth:`KafkaSink.publish` serializes the event and hands it to an idempotent producer
  (``acks=all``, retries without end by default; for brokers older than 0.11, see below) on
  the caller's thread: librdkafka's ``produce`` only appends to the producer's own buffer and
  returns (about 5 us), and its C threads do the sending. A broker that goes away holds events in that buffer; once it is full,
  in a bounded overflow queue of the sink's own, behind which every later event waits its turn
  (order is kept). What the overflow cannot take is dropped and counted
  (:attr:`~KafkaSink.dropped`), never silently, never blocking. Delivery resumes where it
  stopped once the broker is back;
* one background thread serves the producer (failed deliveries, errors) and moves the overflow
  into the producer as room comes back. It sleeps inside librdkafka, without the GIL, and
  runs Python only on a failure or an overflow: there is no per-event hand-over between
  threads (measured, such a hand-over cost the event loop more than the event's own work);
* an event counts as :attr:`~KafkaSink.sent` only once the broker has acknowledged it: the
  producer reports failures only (``delivery.report.only.error``), and ``sent`` is what it
  accepted minus what it still holds (``len(producer)``: unacknowledged records and unserved
  reports) minus what it reported failed, read in an order that can only undercount. One that
  the broker refused, or that was still unconfirmed when :meth:`~KafkaSink.close` ran out of
  time, counts as :attr:`~KafkaSink.failed`.

Records are keyed by task id (all of a task's events go to one partition, where the producer
keeps them in ``seq`` order, retries included) and partitioned as Java clients do
(murmur2), so consumers in any language find a task's events where they expect them. The value
is ``serialize(event)``: compact JSON of :meth:`Event.to_json` (UTF-8) unless a serializer (say,
protobuf) is given. The topic must exist, or the brokers must create topics on first use.

Brokers older than Apache Kafka 0.11 have no idempotent producer, and those older than 0.10 do
not say which requests they speak: name their version (``broker_version``, in the URL
``?broker_version=0.9.0.1``) and the sink produces as :func:`delivery_settings` says, still at
least once and in order (one request in flight, retries without end), at the cost of a
duplicate where a broker fails between keeping a batch and acknowledging it. Without it (or for
0.11 and later) the producer is idempotent, as above; pointed at a 0.9 broker without it, the
producer waits on a version request that broker never answers, so events stay pending (never
counted sent) until the overflow drops them. The tests run both ways: on Apache Kafka 0.9.0.1
with ``broker_version`` and on an idempotent Kafka-protocol broker without
(tests/integration/test_kafka_events.py).

Counters (read them from any thread; each only grows): ``queued`` (accepted by ``publish``),
``dropped`` (refused by ``publish``: overflow full, or the sink closed), ``sent``, ``failed``.
Every publish is queued or dropped; every queued event is in time sent, failed or still
:attr:`~KafkaSink.pending`.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from coordinator.observability.events import Event
from coordinator.observability.sinks import SinkConfigError

log = logging.getLogger(__name__)

#: Events the sink holds for a broker that is slow or away, by default (about 30 MB of JSON).
DEFAULT_QUEUE_SIZE = 100_000
#: How long :meth:`KafkaSink.close` waits for outstanding acknowledgements, by default.
DEFAULT_CLOSE_TIMEOUT_S = 10.0
DEFAULT_PORT = 9092

#: The first Apache Kafka versions with the idempotent producer, and with ApiVersionRequest
#: (before it, librdkafka must be told the broker's version); the oldest librdkafka speaks to.
IDEMPOTENT_SINCE = (0, 11)
API_VERSIONS_SINCE = (0, 10)
OLDEST_BROKER = (0, 8)
#: librdkafka's value for "retry without end" (its default; said explicitly where it matters).
_RETRIES_WITHOUT_END = 2**31 - 1
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:\.(\d+))?")

#: Kafka's own rule for topic names.
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")
_HOST = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
#: How long the serving thread waits inside librdkafka between looks at the overflow.
_SERVE_POLL_S = 0.1
#: How long the producer gathers records into one request (librdkafka's ``linger.ms``): an
#: event reaches the broker at most this much later, and the broker sees a request every
#: 50 ms instead of one every few events.
LINGER_MS = 50


#: One encoder for every record (``json.dumps`` with options builds a new one per call).
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
#: JSON of one string (quotes and escapes), the encoder's own C routine.
_string: Callable[[str], str] = getattr(json.encoder, "c_encode_basestring", None) \
    or json.encoder.encode_basestring


#: librdkafka settings the sink owns, under every name librdkafka accepts for them: delivery
#: (acks, idempotence, retries, requests in flight, how long an event may wait), keyed
#: partitioning (per-task order), the delivery reports it counts from, and the broker version.
DELIVERY_KEYS = frozenset({
    "acks", "request.required.acks", "enable.idempotence", "enable.gapless.guarantee",
    "retries", "message.send.max.retries", "max.in.flight.requests.per.connection",
    "max.in.flight", "message.timeout.ms", "delivery.timeout.ms", "partitioner",
    "partitioner_cb", "delivery.report.only.error", "on_delivery", "dr_cb", "dr_msg_cb",
})


def delivery_settings(broker_version: str | None = None) -> dict[str, Any]:
    """The producer settings that make delivery at least once and in order per key, for brokers
    of ``broker_version`` and later (None: 0.11 or later, which answer ApiVersionRequest).

    * 0.11 and later: ``acks=all`` and the idempotent producer (librdkafka then keeps at most 5
      requests in flight and retries without end; retries neither duplicate nor reorder);
    * 0.10: no idempotence there: ``acks=all``, one request in flight (a retry cannot overtake
      the batch after it), retries without end (a retry may duplicate, never lose);
    * 0.8 and 0.9: the same, and librdkafka is told the version (``broker.version.fallback``)
      instead of asking with ApiVersionRequest, which these brokers do not answer.

    Raises:
        SinkConfigError: not a version (``0.9.0.1``, ``2.8.0``), or older than 0.8.
    """
    settings: dict[str, Any] = {"acks": "all", "enable.idempotence": True}
    if broker_version is None:
        return settings
    match = _VERSION.fullmatch(broker_version)
    if match is None:
        raise SinkConfigError(f"broker_version {broker_version!r} is not a Kafka version "
                              "(like 0.9.0.1 or 3.7.0)")
    version = (int(match[1]), int(match[2]))
    if version < OLDEST_BROKER:
        raise SinkConfigError(f"broker_version {broker_version}: the Kafka client speaks to "
                              "brokers from 0.8.0 on")
    if version < IDEMPOTENT_SINCE:
        settings.update({"enable.idempotence": False,
                         "max.in.flight.requests.per.connection": 1,
                         "retries": _RETRIES_WITHOUT_END})
    if version < API_VERSIONS_SINCE:
        settings.update({"api.version.request": False,
                         "broker.version.fallback": broker_version})
    return settings


def json_bytes(event: Event) -> bytes:
    """The default record value: compact JSON of :meth:`Event.to_json`, UTF-8.

    Byte for byte what ``json.dumps(event.to_json(), separators=(",", ":"),
    ensure_ascii=False)`` writes, at about a fifth of its cost: the record's layout is fixed,
    so only its strings and numbers are encoded (``dumps`` builds and walks a dict per event,
    9 us of the sink's 17 us per event on the development machine; this sink runs twice per
    check-in). A field of an unexpected type falls back to ``dumps``."""
    seq, round_number, schema, at = event.seq, event.round_number, event.schema, event.at
    if not (type(seq) is int and type(round_number) is int and type(schema) is int
            and type(at) is float and math.isfinite(at)):
        return _JSON.encode(event.to_json()).encode()
    values = event.values
    if values:
        parts = []
        for name, value in values.items():
            if type(name) is not str or type(value) not in (float, int) \
                    or not math.isfinite(value):
                return _JSON.encode(event.to_json()).encode()
            parts.append(f"{_string(name)}:{value!r}")
        values_json = "{" + ",".join(parts) + "}"
    else:
        values_json = "{}"
    return (f'{{"schema":{schema},"seq":{seq},"kind":{_string(event.kind.value)},'
            f'"task_id":{_string(event.task_id)},"at":{at!r},"round_number":{round_number},'
            f'"device_id":{_string(event.device_id)},"reason":{_string(event.reason)},'
            f'"detail":{_string(event.detail)},"values":{values_json}}}').encode()


class KafkaSink:
    """An :class:`~coordinator.observability.events.EventSink` that produces to one topic.

    ``publish`` is thread-safe and returns at once. ``serialize`` runs on the sink's thread;
    one that raises counts that event as failed. ``delivery_timeout_s``: how long the producer
    keeps retrying one event before counting it failed (None: until the broker takes it; the
    queues bound what waits meanwhile). ``broker_version``: where the brokers predate Apache
    Kafka 0.11, their version (see :func:`delivery_settings`). ``producer_config``: extra
    librdkafka settings (TLS, SASL, ...), which may not touch delivery (``acks``,
    ``enable.idempotence``, ``retries``, ``max.in.flight.requests.per.connection``) nor the
    broker version (``api.version.request``, ``broker.version.fallback``): ``broker_version``
    sets both, each consistent with the other.

    Raises:
        SinkConfigError: no brokers, a bad topic, queue size or broker version, or a delivery
            setting overridden.
    """

    def __init__(self, brokers: Sequence[str], topic: str, *,
                 serialize: Callable[[Event], bytes] = json_bytes,
                 queue_size: int = DEFAULT_QUEUE_SIZE,
                 delivery_timeout_s: float | None = None,
                 close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
                 broker_version: str | None = None,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        if not brokers:
            raise SinkConfigError("the Kafka sink needs at least one broker")
        if not _TOPIC.fullmatch(topic) or topic in (".", ".."):
            raise SinkConfigError(f"{topic!r} is not a Kafka topic name (1-249 of A-Z a-z 0-9 . _ -)")
        if queue_size < 1:
            raise SinkConfigError(f"queue size {queue_size} must be at least 1")
        overridden = sorted(DELIVERY_KEYS & set(producer_config or {}))
        if overridden:
            raise SinkConfigError(f"the Kafka sink sets {', '.join(overridden)} itself "
                                  "(at-least-once, in-order delivery, counted)")
        versioned = sorted({"api.version.request", "broker.version.fallback"}
                           & set(producer_config or {}))
        if versioned:
            raise SinkConfigError(f"the Kafka sink sets {', '.join(versioned)} itself: name an "
                                  "old broker's version with broker_version")
        delivery = delivery_settings(broker_version)
        if not delivery["enable.idempotence"]:
            # Said once at start: an operator who named a version older than the brokers
            # really run gives up idempotence (and, before 0.10, the modern produce protocol).
            log.warning("Kafka sink to %s: broker_version %s, so the producer is not "
                        "idempotent (acks=all, one request in flight, retries without end: "
                        "a retry may duplicate an event, never lose or reorder one)%s",
                        ",".join(brokers), broker_version,
                        "" if "broker.version.fallback" not in delivery else
                        "; the brokers are not asked their version (pre-0.10 protocol)")
        self.brokers = tuple(brokers)
        self.topic = topic
        self.broker_version = broker_version
        #: Whether retries are free of duplicates (False for brokers older than 0.11).
        self.idempotent: bool = delivery["enable.idempotence"]
        self.queue_size = queue_size
        self._serialize = serialize
        self._close_timeout_s = close_timeout_s
        #: Held around producing and the overflow: events reach the producer in publish order.
        self._lock = threading.Lock()
        #: Events the producer's buffer had no room for, oldest first (at most ``queue_size``).
        self._overflow: collections.deque[Event] = collections.deque()
        self._counts_lock = threading.Lock()
        self.queued = 0
        self.dropped = 0
        self.failed = 0
        #: Records the producer accepted, and of those the ones it reported failed.
        self._produced = 0
        self._delivery_failed = 0
        #: The highest ``sent`` read so far (reads never go back), and its final value once
        #: closed (the producer may still deliver what close counted failed).
        self._sent_floor = 0
        self._final_sent: int | None = None
        self._closing = threading.Event()
        self._closed = False
        #: Producer errors since the last acknowledgement (an outage logs a few lines).
        self._errors = 0
        self._sent_at_last_error = 0
        self._producer = Producer({
            "bootstrap.servers": ",".join(self.brokers),
            # At least once, in order: the broker acknowledges only once every in-sync
            # replica has the record; idempotence makes retries neither duplicate nor reorder
            # (before 0.11: one request in flight, so that a retry cannot reorder).
            **delivery,
            "message.timeout.ms": 0 if delivery_timeout_s is None else int(delivery_timeout_s * 1000),
            "partitioner": "murmur2_random",
            "linger.ms": LINGER_MS,
            # Successes are counted from the producer's length, not one callback each.
            "delivery.report.only.error": True,
            "on_delivery": self._on_delivery,
            # Back to a returning broker within a second, not librdkafka's 10 s.
            "reconnect.backoff.ms": 100,
            "reconnect.backoff.max.ms": 1000,
            # librdkafka logs every failed reconnect; error_cb reports the same, thinned.
            "logger": logging.getLogger(f"{__name__}.librdkafka"),
            "log_level": 2,
            "error_cb": self._on_error,
            **dict(producer_config or {}),
        })
        self._thread = threading.Thread(target=self._run, name="fedcoord-kafka-sink",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> KafkaSink:
        """A sink for ``kafka://HOST[:PORT][,HOST[:PORT]...]/TOPIC[?queue_size=N]
        [&broker_version=V]`` (port 9092 where none is given; ``broker_version`` only for
        brokers older than 0.11); ``options`` go to the constructor.

        Raises:
            SinkConfigError: naming the URL and what is wrong in it.
        """
        try:
            brokers, topic, query = _parse_url(url)
            if "queue_size" in query:
                try:
                    options.setdefault("queue_size", int(query.pop("queue_size")))
                except ValueError:
                    raise SinkConfigError("queue_size must be an integer") from None
            if "broker_version" in query:
                options.setdefault("broker_version", query.pop("broker_version"))
            if query:
                raise SinkConfigError(f"unknown parameter(s) {', '.join(sorted(query))} "
                                      "(known: queue_size, broker_version)")
            return cls(brokers, topic, **options)
        except SinkConfigError as exc:
            raise SinkConfigError(f"--events {url}: {exc}") from None

    name = "kafka"

    def counts(self) -> dict[str, int]:
        """``queued``, ``sent``, ``dropped``, ``failed``, and ``pending`` (not a total: what
        waits now)."""
        sent = self.sent
        with self._counts_lock:
            return {"queued": self.queued, "sent": sent, "dropped": self.dropped,
                    "failed": self.failed, "pending": self.queued - sent - self.failed}

    @property
    def sent(self) -> int:
        """Events the broker acknowledged (never more; briefly fewer while reports wait)."""
        with self._counts_lock:
            if self._final_sent is not None:
                return self._final_sent
            produced = self._produced
        # Read in this order, each change between the reads can only lower the result:
        # records produced after the first read are in the length but not in ``produced``,
        # and a failure served after the length was read is in both.
        holding = len(self._producer)
        with self._counts_lock:
            self._sent_floor = max(self._sent_floor, produced - holding - self._delivery_failed)
            return self._sent_floor

    @property
    def pending(self) -> int:
        """Events queued but neither sent nor failed yet (in the overflow, or awaiting the
        broker's acknowledgement)."""
        sent = self.sent
        with self._counts_lock:
            return self.queued - sent - self.failed

    def publish(self, event: Event) -> None:
        """Hands ``event`` to the producer, or queues it behind the ones waiting for room;
        where the overflow is full (or the sink closed) drops and counts it. Never blocks,
        never raises."""
        if self._closing.is_set():
            self._count_drop(event, "the sink is closed")
            return
        with self._lock:
            if self._overflow:  # behind the ones already waiting: order is kept
                if len(self._overflow) >= self.queue_size:
                    full = True
                else:
                    full = False
                    self._overflow.append(event)
            else:
                full = False
                if self._produce(event) is False:
                    self._overflow.append(event)
            if not full:
                with self._counts_lock:
                    self.queued += 1
        if full:
            self._count_drop(event, f"the producer's buffer and the overflow of "
                                    f"{self.queue_size} are full")

    def close(self) -> None:
        """Delivers what is queued, waiting at most ``close_timeout_s`` for the broker's
        acknowledgements; whatever is still unconfirmed then counts as failed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._close_timeout_s
        self._closing.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._producer.flush(max(0.0, deadline - time.monotonic()))
        sent = self.sent
        with self._lock, self._counts_lock:
            self._overflow.clear()
            self._final_sent = sent
            lost = self.queued - sent - self.failed
            self.failed += lost
        if lost:
            log.warning("Kafka sink closed with %d event(s) to %s unconfirmed (counted failed)",
                        lost, self.topic)

    def _produce(self, event: Event) -> bool | None:
        """Serializes and produces ``event`` (called holding ``_lock``): True when the producer
        took it, False when its buffer is full (the caller keeps the event), None when the
        event failed for good (counted)."""
        try:
            value = self._serialize(event)
        except Exception:  # noqa: BLE001 - one bad event must not stop the stream
            log.exception("serializing %s event %d of task %s failed", event.kind.value,
                          event.seq, event.task_id)
            self._count_failed()
            return None
        try:
            self._producer.produce(self.topic, value, event.task_id.encode())
        except BufferError:
            return False
        except KafkaException as exc:
            log.error("producing %s event %d of task %s failed: %s", event.kind.value,
                      event.seq, event.task_id, exc)
            self._count_failed()
            return None
        with self._counts_lock:
            self._produced += 1
        return True

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:
            # Not expected; said loudly: from here on the overflow only fills and drops.
            log.exception("the Kafka sink's serving thread died; events to %s may be dropped "
                          "from now on", self.topic)

    def _serve(self) -> None:
        # Sleeps in librdkafka (GIL released) until a failure report or an error arrives, or
        # the interval ends; then moves what waits in the overflow while the producer has room.
        deadline: float | None = None
        while True:
            self._producer.poll(_SERVE_POLL_S)
            with self._lock:
                while self._overflow:
                    taken = self._produce(self._overflow[0])
                    if taken is False:
                        break
                    self._overflow.popleft()
                waiting = bool(self._overflow)
            if self._closing.is_set():
                # Closing: the overflow still gets its chance until close's time is up.
                if deadline is None:
                    deadline = time.monotonic() + self._close_timeout_s
                if not waiting or time.monotonic() >= deadline:
                    return

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        # Failures only (``delivery.report.only.error``).
        if error is None:
            return
        with self._counts_lock:
            self._delivery_failed += 1
            self.failed += 1
            failed = self.failed
        if _worth_logging(failed):
            log.error("event to %s not delivered (%d failed so far): %s", self.topic, failed,
                      error)

    def _on_error(self, error: KafkaError) -> None:
        # Brokers unreachable and the like: librdkafka retries by itself.
        sent = self.sent
        with self._counts_lock:
            if sent > self._sent_at_last_error:  # deliveries since: a new outage
                self._errors = 0
                self._sent_at_last_error = sent
            self._errors += 1
            errors = self._errors
        if _worth_logging(errors):
            log.warning("Kafka sink (%s): %s (%d error(s) since the last delivery)",
                        ",".join(self.brokers), error.str(), errors)

    def _count_failed(self) -> None:
        with self._counts_lock:
            self.failed += 1

    def _count_drop(self, event: Event, why: str) -> None:
        with self._counts_lock:
            self.dropped += 1
            dropped = self.dropped
        if _worth_logging(dropped):
            log.warning("Kafka sink dropped %s event %d of task %s: %s (%d dropped so far)",
                        event.kind.value, event.seq, event.task_id, why, dropped)


def _worth_logging(count: int) -> bool:
    """The 1st, 2nd, 4th, 8th, ... occurrence: an outage logs a few lines, not millions."""
    return count & (count - 1) == 0


def _parse_url(url: str) -> tuple[list[str], str, dict[str, str]]:
    parts = urlsplit(url)
    if parts.scheme != "kafka":
        raise SinkConfigError(f"scheme {parts.scheme!r} is not kafka")
    if parts.fragment:
        raise SinkConfigError("a fragment (#...) means nothing here")
    if "@" in parts.netloc:
        raise SinkConfigError("credentials do not belong in the URL")
    if not parts.netloc:
        raise SinkConfigError("no broker (expected kafka://HOST[:PORT][,HOST[:PORT]...]/TOPIC)")
    brokers = [_broker(b) for b in parts.netloc.split(",")]
    topic = parts.path.removeprefix("/")
    if not topic:
        raise SinkConfigError("no topic (expected kafka://BROKER[,BROKER...]/TOPIC)")
    if "/" in topic:
        raise SinkConfigError(f"{topic!r}: one topic, no further path")
    try:
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise SinkConfigError(f"cannot read the parameters {parts.query!r}") from None
    return brokers, topic, query


def _broker(text: str) -> str:
    host, sep, port_text = text.rpartition(":") if not text.endswith("]") else ("", "", "")
    if not sep:
        host, port_text = text, str(DEFAULT_PORT)
    if not host or not _HOST.fullmatch(host):
        raise SinkConfigError(f"broker {text!r}: not HOST[:PORT]")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SinkConfigError(f"broker {text!r}: port {port_text!r} is not 1-65535")
    return f"{host}:{int(port_text)}"


__all__ = ["DEFAULT_QUEUE_SIZE", "KafkaSink", "delivery_settings", "json_bytes"]
