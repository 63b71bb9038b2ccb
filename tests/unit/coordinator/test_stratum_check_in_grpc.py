"""A device's stratum travels in its check-in over gRPC: the coordinator (real server, port 0,
SQLite file) takes a good one and refuses a bad one with INVALID_ARGUMENT naming the field,
whose message the agent's client surfaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.app import EmbeddedCoordinator
from coordinator.settings import CoordinatorSettings
from core.protocol import CheckInOutcome
from core.security.identity import DeviceKey
from core.types import DeviceAttributes
from device_agent.errors import Rejected
from device_agent.transport.client import DeviceClient, RetryPolicy


def test_a_declared_stratum_is_taken_and_a_bad_one_is_invalid_argument(tmp_path: Path) -> None:
    settings = CoordinatorSettings(host="127.0.0.1", port=0, db_url=f"sqlite:///{tmp_path}/c.db",
                                   store_dir=tmp_path / "store")
    with EmbeddedCoordinator(settings) as coordinator:
        client = DeviceClient(f"127.0.0.1:{coordinator.port}",
                              policy=RetryPolicy(give_up_after_s=5))
        try:
            key = DeviceKey.generate()
            client.enroll(key)
            ok = client.check_in(key, DeviceAttributes(), None, stratum="low_end")
            assert ok.outcome is CheckInOutcome.NO_TASK  # taken; no task is running
            with pytest.raises(Rejected, match="INVALID_ARGUMENT: stratum: must be letters, "
                                               "digits, _ or - only, got 'bad name'"):
                client.check_in(key, DeviceAttributes(), None, stratum="bad name")
            with pytest.raises(Rejected, match="INVALID_ARGUMENT: stratum: must be at most 32"):
                client.check_in(key, DeviceAttributes(), None, stratum="x" * 33)
        finally:
            client.close()
