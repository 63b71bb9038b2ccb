"""Two coordinator replicas on one database (real gRPC servers on port 0, one SQLite file, one
model store): the first leads; the standby serves admin reads, refuses devices and task
changes with UNAVAILABLE naming the leader, says so on /readyz, and leaves the model store
alone; an agent client given both addresses reaches the leader; when the leader stops, it
hands the lease over at once; a leader whose lease was taken stops leading and is fenced."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.app import EmbeddedCoordinator
from coordinator.replication import PROMOTION_FAILED_EXIT
from coordinator.replication import Role as LeaseRole
from coordinator.security.roles import Role
from coordinator.settings import CoordinatorSettings, ReplicaSettings
from coordinator.storage import FileBlobStore
from coordinator.storage.errors import Fenced
from coordinator.transport.standby import leader_only
from core.protocol import CheckInOutcome
from core.security.identity import DeviceKey
from core.types import API_VERSION, DeviceAttributes
from device_agent.transport.client import DeviceClient, RetryPolicy
from fedctl.admin import AdminClient, AdminError
from protos.fedcoord.v1 import device_pb2, device_pb2_grpc

DEVICES, ADMIN = "fedcoord.v1.DeviceService", "fedcoord.v1.AdminService"
SERVING, NOT_SERVING = (health_pb2.HealthCheckResponse.SERVING,
                        health_pb2.HealthCheckResponse.NOT_SERVING)

#: Long, so that a take-over well within it shows the stopping leader released the lease.
TTL_S = 10.0


def replica(tmp_path: Path) -> EmbeddedCoordinator:
    return EmbeddedCoordinator(CoordinatorSettings(
        host="127.0.0.1", port=0, http_port=0, db_url=f"sqlite:///{tmp_path}/c.db",
        store_dir=tmp_path / "store", replica=ReplicaSettings(lease_ttl_s=TTL_S)))


def leads(c: EmbeddedCoordinator) -> bool:
    return c._coordinator is not None and c._coordinator.leading


def wait_until(condition: Callable[[], bool], timeout_s: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - started


def readyz(c: EmbeddedCoordinator) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.http_port}/readyz") as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def health(c: EmbeddedCoordinator) -> dict[str, int]:
    """gRPC health by service name ("" is the whole server), as a load balancer checks it."""
    with grpc.insecure_channel(f"127.0.0.1:{c.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {service: stub.Check(health_pb2.HealthCheckRequest(service=service),
                                    timeout=10).status
                for service in ("", DEVICES, ADMIN)}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[EmbeddedCoordinator, EmbeddedCoordinator]]:
    leader = replica(tmp_path)
    leader.start()
    standby = replica(tmp_path)
    try:
        wait_until(lambda: leads(leader), 30)
        standby.start()
        yield leader, standby
    finally:
        for c in (standby, leader):
            if c._thread.is_alive():  # not stopped by the test
                c.stop()


def test_a_standby_serves_reads_and_sends_devices_and_changes_to_the_leader(
        pair: tuple[EmbeddedCoordinator, EmbeddedCoordinator]) -> None:
    leader, standby = pair
    leader_at, standby_at = f"127.0.0.1:{leader.port}", f"127.0.0.1:{standby.port}"
    _, token = leader.security.admin.create_token(Role.ADMIN)
    assert not leads(standby)

    with AdminClient(standby_at, token=token) as admin:
        assert admin.list_tasks() == []  # reads: served from the database
        with pytest.raises(AdminError) as refused:
            admin.cancel_task("no-such-task")
    assert refused.value.code == "UNAVAILABLE"
    assert f"standby replica; the leader is at {leader_at}" in refused.value.message

    with grpc.insecure_channel(standby_at) as channel:
        with pytest.raises(grpc.RpcError) as device_refused:
            device_pb2_grpc.DeviceServiceStub(channel).CheckIn(
                device_pb2.CheckInRequest(api_version=API_VERSION, device_id="d"), timeout=5)
    assert device_refused.value.code() is grpc.StatusCode.UNAVAILABLE
    assert leader_at in (device_refused.value.details() or "")

    status, body = readyz(standby)
    assert status == 503 and leader_at in body
    assert readyz(leader)[0] == 200
    assert standby._coordinator is not None
    assert getattr(standby._coordinator.blobs, "_lock_fd", None) is None, \
        "a standby must not take the model store"
    with pytest.raises(Fenced):  # and cannot write the rounds, whatever calls it
        standby._coordinator.store.fail_open_rounds("a standby's bug", 0.0)


def test_a_standby_refuses_every_change_of_tokens_and_devices(
        pair: tuple[EmbeddedCoordinator, EmbeddedCoordinator]) -> None:
    """A change served by a standby would reach the database but not the leader's caches (a
    device revoked there stayed admitted by the leader): a standby serves reads only."""
    leader, standby = pair
    _, token = leader.security.admin.create_token(Role.ADMIN)
    with AdminClient(f"127.0.0.1:{standby.port}", token=token) as admin:
        assert admin.list_devices() == [] and admin.whoami()
        changes: list[Callable[[], object]] = [
            lambda: admin.revoke_device("d-1"), lambda: admin.create_token("viewer"),
            lambda: admin.revoke_token("t-1"), lambda: admin.create_enrollment_token(5)]
        for change in changes:
            with pytest.raises(AdminError) as refused:
                change()
            assert refused.value.code == "UNAVAILABLE", refused.value.message


def test_an_admin_client_given_both_addresses_sends_changes_on_to_the_leader(
        pair: tuple[EmbeddedCoordinator, EmbeddedCoordinator]) -> None:
    """`fedctl --coordinator STANDBY,LEADER ...`: reads are served where they land, and a
    change the standby refuses (UNAVAILABLE) goes on to the next address, the leader."""
    leader, standby = pair
    _, token = leader.security.admin.create_token(Role.ADMIN)
    both = f"127.0.0.1:{standby.port},127.0.0.1:{leader.port}"
    with AdminClient(both, token=token) as admin:
        assert admin.list_tasks() == [] and admin.target == f"127.0.0.1:{standby.port}"
        with pytest.raises(AdminError) as answered:
            admin.cancel_task("no-such-task")
        assert answered.value.code == "NOT_FOUND", answered.value.message  # the leader's
        assert admin.target == f"127.0.0.1:{leader.port}"
    with AdminClient(f"127.0.0.1:1,127.0.0.1:{leader.port}", token=token,
                     timeout_s=5) as admin:
        assert admin.list_tasks() == []  # nobody at the first address: the next serves
    with AdminClient(f"127.0.0.1:{standby.port}", token=token) as admin:
        with pytest.raises(AdminError) as refused:  # one address: the standby's refusal
            admin.cancel_task("no-such-task")
        assert refused.value.code == "UNAVAILABLE"


def test_the_standby_gate_serves_the_admin_reads_only() -> None:
    admin, device = "/fedcoord.v1.AdminService/", "/fedcoord.v1.DeviceService/"
    assert not any(leader_only(admin + m) for m in ("GetTask", "ListTasks", "ListRounds",
                                                    "DownloadModel", "ListAudit", "WhoAmI"))
    assert all(leader_only(admin + m) for m in ("CreateTask", "CancelTask", "RevokeDevice",
                                                "CreateToken", "RevokeToken", "NewChange"))
    assert all(leader_only(device + m) for m in ("CheckIn", "Enroll", "UploadUpdate"))
    assert not leader_only("/grpc.health.v1.Health/Check")


def test_an_agent_given_both_addresses_reaches_the_leader_through_the_standby(
        pair: tuple[EmbeddedCoordinator, EmbeddedCoordinator]) -> None:
    leader, standby = pair
    # A backoff this long would show: moving on to the next address costs no wait.
    client = DeviceClient(f"127.0.0.1:{standby.port},127.0.0.1:{leader.port}",
                          policy=RetryPolicy(base_s=30.0, give_up_after_s=20))
    try:
        key = DeviceKey.generate()
        started = time.monotonic()
        client.enroll(key)
        answer = client.check_in(key, DeviceAttributes(), None)
        assert time.monotonic() - started < 10
        assert answer.outcome is CheckInOutcome.NO_TASK
        assert client.target == f"127.0.0.1:{leader.port}"
    finally:
        client.close()


def test_grpc_health_sends_devices_to_the_leader_only(
        pair: tuple[EmbeddedCoordinator, EmbeddedCoordinator]) -> None:
    leader, standby = pair

    assert health(leader) == {"": SERVING, DEVICES: SERVING, ADMIN: SERVING}
    assert health(standby) == {"": NOT_SERVING, DEVICES: NOT_SERVING, ADMIN: SERVING}, \
        "a standby serves the admin reads, but no device"

    leader.stop()
    wait_until(lambda: leads(standby), TTL_S)
    wait_until(lambda: health(standby)[DEVICES] == SERVING, 5)
    assert health(standby) == {"": SERVING, DEVICES: SERVING, ADMIN: SERVING}


def test_a_stopping_leader_hands_the_lease_over_at_once(
        pair: tuple[EmbeddedCoordinator, EmbeddedCoordinator]) -> None:
    leader, standby = pair

    leader.stop()
    took_s = wait_until(lambda: leads(standby), TTL_S)

    assert took_s < TTL_S / 2, f"the standby waited {took_s:.1f} s: the lease was not released"
    assert readyz(standby)[0] == 200


def test_a_leader_whose_lease_was_taken_stops_leading_and_cannot_write(tmp_path: Path) -> None:
    leader = EmbeddedCoordinator(CoordinatorSettings(
        host="127.0.0.1", port=0, db_url=f"sqlite:///{tmp_path}/c.db",
        store_dir=tmp_path / "store", replica=ReplicaSettings(lease_ttl_s=1.0)))
    with leader:
        wait_until(lambda: leads(leader), 30)
        coordinator = leader._coordinator
        assert coordinator is not None
        exits: list[int] = []
        coordinator.exit_when_lost(0.1, exits.append)
        # Another replica took the lease while this one stalled (a newer epoch).
        with sqlite3.connect(tmp_path / "c.db") as db:
            db.execute("UPDATE coordinator_leases SET epoch = epoch + 1, holder = 'other', "
                       "address = 'elsewhere:7070'")

        wait_until(lambda: not leads(leader), 5)

        assert "passed to another replica" in coordinator.lost_reason
        wait_until(lambda: health(leader)[DEVICES] == NOT_SERVING, 5)
        assert health(leader)[""] == NOT_SERVING
        wait_until(lambda: exits == [1], 5)  # from the loss on: nothing else stops it here
        with pytest.raises(Fenced, match="elsewhere:7070"):
            coordinator.store.fail_open_rounds("a deposed leader's recovery", 0.0)


@contextlib.contextmanager
def elected_but_store_locked(
        tmp_path: Path) -> Iterator[tuple[EmbeddedCoordinator, FileBlobStore]]:
    """A replica elected while the model store is still locked (a deposed leader on this
    machine that has not exited yet): it holds the lease and waits for the store."""
    held = FileBlobStore(tmp_path / "store")
    held.lock()
    elected = replica(tmp_path)
    elected.start()
    try:
        wait_until(lambda: elected._coordinator is not None
                   and elected._coordinator.leadership is not None
                   and elected._coordinator.leadership.role is LeaseRole.LEADER, 30)
        yield elected, held
    finally:
        elected.stop()
        held.unlock()


def test_an_elected_replica_waiting_for_the_model_store_names_no_leader(
        tmp_path: Path) -> None:
    with elected_but_store_locked(tmp_path) as (elected, held):
        coordinator = elected._coordinator
        assert coordinator is not None and not leads(elected)

        refusal = coordinator.standby_reason()
        assert refusal is not None and "just elected" in refusal, refusal
        assert f"{elected.port}" not in refusal, "it must not send callers to itself"
        assert health(elected)[DEVICES] == NOT_SERVING

        held.unlock()
        wait_until(lambda: leads(elected), 10)
        assert health(elected)[DEVICES] == SERVING


def test_a_replica_that_cannot_take_over_gives_up_with_the_promotion_failed_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery fails (so it would on every replica): the process ends with exit status 3,
    which `fedctl cluster up` (and a supervisor's restart limit) counts as a failed start,
    instead of every replica taking the lease and failing in turn for ever."""
    with elected_but_store_locked(tmp_path) as (elected, held):
        coordinator = elected._coordinator
        assert coordinator is not None
        exits: list[int] = []
        coordinator.exit_when_lost(0.1, exits.append)

        def fails() -> None:
            raise RuntimeError("a task's model file is unreadable")

        monkeypatch.setattr(coordinator.service, "recover", fails)
        held.unlock()
        wait_until(lambda: exits != [], 10)

        assert exits == [PROMOTION_FAILED_EXIT]
        assert coordinator.promotion_failed and not leads(elected)
        assert "recovering the tasks failed: a task's model file is unreadable" in \
            coordinator.lost_reason
