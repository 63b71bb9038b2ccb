"""The event sinks a coordinator is configured with (``serve --events URL``), by URL scheme.

=======================================  ====================================================
URL                                      sink
=======================================  ====================================================
``kafka://BROKER[,BROKER...]/TOPIC``     :class:`coordinator.observability.kafka_sink.KafkaSink`
=======================================  ====================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from coordinator.observability.events import EventSink


class SinkConfigError(ValueError):
    """An event sink URL that cannot be used; the message names the URL and why."""


def open_sinks(urls: Sequence[str]) -> list[EventSink]:
    """One sink per URL, opened (a sink that delivers elsewhere starts its delivery here).

    Raises:
        SinkConfigError: an unknown scheme, or a URL its sink refuses.
    """
    sinks: list[EventSink] = []
    try:
        for url in urls:
            sinks.append(_open(url))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _open(url: str) -> EventSink:
    scheme = urlsplit(url).scheme
    if scheme == "kafka":
        try:
            from coordinator.observability.kafka_sink import KafkaSink
        except ImportError as exc:
            raise SinkConfigError(f"--events {url}: the Kafka sink is not available ({exc}); "
                                  "install fedcoord[kafka]") from None
        sink: EventSink = KafkaSink.from_url(url)
        return sink
    raise SinkConfigError(f"--events {url}: unknown scheme {scheme!r}; expected "
                          "kafka://BROKER[,BROKER...]/TOPIC")
