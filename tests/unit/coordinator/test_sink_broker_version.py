"""A Kafka sink told its brokers' version (``?broker_version=``) produces as those brokers can,
still at least once and in order per task: idempotent from 0.11 (and by default), one request
in flight with retries without end before it, the version named to librdkafka before 0.10.
Nothing may weaken that default, the old-broker settings included."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from coordinator.observability.kafka_sink import KafkaSink, delivery_settings
from coordinator.observability.sinks import SinkConfigError, open_sinks

IDEMPOTENT = {"acks": "all", "enable.idempotence": True}
ONE_IN_FLIGHT = {"acks": "all", "enable.idempotence": False,
                 "max.in.flight.requests.per.connection": 1, "retries": 2**31 - 1}


def a_port_with_no_broker() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def opened(url: str) -> Iterator[KafkaSink]:
    (sink,) = open_sinks([url])
    try:
        assert isinstance(sink, KafkaSink)
        yield sink
    finally:
        sink.close()


@pytest.mark.parametrize("version", [None, "0.11.0.0", "2.8.1", "3.7.0", "4.1.0"])
def test_brokers_from_0_11_on_get_the_idempotent_producer(version: str | None) -> None:
    assert delivery_settings(version) == IDEMPOTENT


@pytest.mark.parametrize("version", ["0.10.0.1", "0.10.2.2"])
def test_0_10_brokers_get_one_request_in_flight_and_retries_without_end(version: str) -> None:
    assert delivery_settings(version) == ONE_IN_FLIGHT


@pytest.mark.parametrize("version", ["0.8.2.2", "0.9.0.1", "0.9.0"])
def test_brokers_before_0_10_are_also_named_to_the_client(version: str) -> None:
    assert delivery_settings(version) == {**ONE_IN_FLIGHT, "api.version.request": False,
                                          "broker.version.fallback": version}


@pytest.mark.parametrize(("version", "complaint"), [
    ("nine", "is not a Kafka version"),
    ("0.9", "is not a Kafka version"),
    ("0.9.0.1.2", "is not a Kafka version"),
    ("", "is not a Kafka version"),
    ("0.7.2", "from 0.8.0 on"),
])
def test_a_bad_broker_version_is_refused_naming_it(version: str, complaint: str) -> None:
    url = f"kafka://{a_port_with_no_broker()}/events?broker_version={version}"
    with pytest.raises(SinkConfigError) as refused:
        open_sinks([url])
    assert str(refused.value).startswith(f"--events {url}: broker_version ")
    assert complaint in str(refused.value)


def test_the_url_names_the_broker_version() -> None:
    with opened(f"kafka://{a_port_with_no_broker()}/events?broker_version=0.9.0.1") as sink:
        assert (sink.broker_version, sink.idempotent) == ("0.9.0.1", False)
    with opened(f"kafka://{a_port_with_no_broker()}/events?queue_size=5") as sink:
        assert (sink.broker_version, sink.idempotent, sink.queue_size) == (None, True, 5)


@pytest.mark.parametrize("setting", [
    {"enable.idempotence": False},
    {"acks": "1"},
    {"max.in.flight.requests.per.connection": 5},
    {"retries": 3},
    {"api.version.request": False},
    {"broker.version.fallback": "0.9.0"},
    # librdkafka's other names for the same settings, and what else the sink relies on:
    {"request.required.acks": 1},
    {"max.in.flight": 5},
    {"message.send.max.retries": 2},
    {"enable.gapless.guarantee": True},
    {"message.timeout.ms": 1000},
    {"delivery.timeout.ms": 1000},
    {"partitioner": "random"},
    {"delivery.report.only.error": False},
])
@pytest.mark.parametrize("version", [None, "0.9.0.1"])
def test_producer_config_cannot_weaken_delivery_nor_name_the_version(
        setting: dict[str, object], version: str | None) -> None:
    with pytest.raises(SinkConfigError, match="sets .* itself"):
        KafkaSink([a_port_with_no_broker()], "events", broker_version=version,
                  producer_config=setting)


def test_a_sink_without_idempotence_says_so_once_at_start(
        caplog: pytest.LogCaptureFixture) -> None:
    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "idempotent" in r.getMessage()]

    with caplog.at_level("WARNING", logger="coordinator.observability.kafka_sink"):
        with opened(f"kafka://{a_port_with_no_broker()}/events"):
            pass
        assert said() == []
        with opened(f"kafka://{a_port_with_no_broker()}/events?broker_version=0.9.0.1"):
            pass
    (message,) = said()
    assert "broker_version 0.9.0.1, so the producer is not idempotent" in message
    assert "pre-0.10 protocol" in message
