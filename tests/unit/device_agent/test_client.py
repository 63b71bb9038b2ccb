"""The device's transport: it retries while the coordinator is unreachable, then gives up
after its bounded time; a stop request ends the wait at once."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from core.security.identity import DeviceKey
from core.types import DeviceAttributes
from device_agent.errors import Unreachable
from device_agent.transport.client import DeviceClient, RetryPolicy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_coordinator_is_retried_then_given_up() -> None:
    client = DeviceClient(f"127.0.0.1:{free_port()}",
                          policy=RetryPolicy(base_s=0.05, cap_s=0.2, give_up_after_s=1.0,
                                             call_timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(Unreachable, match="unreachable for 1 s"):
        client.check_in(DeviceKey.generate(), DeviceAttributes(), None)
    assert 1.0 <= time.monotonic() - started < 4.0
    client.close()


def test_stop_interrupts_the_backoff() -> None:
    stop = threading.Event()
    client = DeviceClient(f"127.0.0.1:{free_port()}", stop=stop,
                          policy=RetryPolicy(base_s=5, cap_s=5, give_up_after_s=60,
                                             call_timeout_s=0.5))
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Unreachable, match="stopped"):
        client.check_in(DeviceKey.generate(), DeviceAttributes(), None)
    assert time.monotonic() - started < 3
    client.close()
