"""What becomes of the events each sink is given is on ``/metrics``: a Kafka sink whose broker
is away and whose buffers are full counts what it dropped there, never silently."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.observability.events import EventHub, EventKind
from coordinator.observability.kafka_sink import KafkaSink
from coordinator.observability.metrics import TaskCollector
from coordinator.observability.store_sink import StoreSink
from coordinator.rounds.clock import ManualClock
from coordinator.storage import InMemoryStore
from coordinator.storage.event_log import open_event_log
from tests.unit.coordinator.test_round_service import make_service


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def a_port_with_no_broker() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_a_kafka_sink_that_overflows_counts_its_drops_on_the_metrics_page(tmp_path: Path) -> None:
    store = InMemoryStore()
    service = make_service(store, ManualClock(), tmp_path)
    kafka = KafkaSink([a_port_with_no_broker()], "nowhere", queue_size=10, close_timeout_s=0.5,
                      producer_config={"queue.buffering.max.messages": 5})
    event_store = StoreSink(open_event_log(store))
    hub = EventHub([kafka, event_store])
    registry = CollectorRegistry()
    registry.register(TaskCollector(service, store, hub))
    try:
        for _ in range(100):
            hub.emit(EventKind.UPLOAD_ACCEPTED, "task", time.time(), device_id="d")
        seen = samples(registry)

        def value(outcome: str, sink: str = "kafka") -> float:
            return seen[("fedcoord_event_sink_events_total",
                         (("outcome", outcome), ("sink", sink)))]

        assert value("queued") + value("dropped") == 100
        assert value("dropped") >= 100 - 10 - 5 - 1, "the overflow (10) and the buffer (5)"
        assert value("sent") == 0 and value("failed") == 0
        assert seen[("fedcoord_event_sink_pending", (("sink", "kafka"),))] == value("queued")
        assert value("lost", sink="store") == 0
    finally:
        hub.close()
    after = samples(registry)
    assert after[("fedcoord_event_sink_events_total",
                  (("outcome", "failed"), ("sink", "kafka")))] == value("queued"), \
        "closed with the broker away: what was queued counts failed"
    assert after[("fedcoord_event_sink_pending", (("sink", "kafka"),))] == 0
