"""The security posture over real gRPC, against `fedctl coordinator serve` in a process:
what an attacker tries is refused with its status, and honest devices' rounds still commit;
engineers' credentials and roles, for every admin RPC; the audit trail."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import (
    ADMIN_TOKEN,
    ENV,
    FEDCTL_CMD,
    CoordinatorProcess,
    shared_coordinator,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)
from rogue import RogueDevice, status_of

from coordinator.security.roles import REQUIRED_ROLE, Role
from core.security.identity import DeviceKey
from core.taskspec import load_task_file
from core.types import API_VERSION
from fedctl.admin import AdminClient
from protos.fedcoord.v1 import admin_pb2

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """One coordinator for the module's tests (each makes and looks at its own tasks, devices
    and tokens)."""
    yield from shared_coordinator(tmp_path_factory)


def fedctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True,
                          env=env or ENV, timeout=120)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_forged_ids_replays_floods_and_extra_keys_are_refused_while_honest_rounds_commit(
    tmp_path: Path,
) -> None:
    coordinator = CoordinatorProcess(tmp_path)
    coordinator.start(["--enrollment", "token", "--rate-limit", "device-checkin=1/3"])
    try:
        with coordinator.admin() as admin:
            honest = admin.create_enrollment_token(4, 600, "fleet").secret
            attacker = admin.create_enrollment_token(2, 600, "attacker").secret
            # One round: the attacks below all come while it selects and trains.
            task_id = admin.create_task(load_task_file(write_task(
                tmp_path / "t.yaml", rounds=1, clients_per_round=4, min_reports=3,
                selection_window_s=2.0))).task_id
        agent = start_agent(coordinator.target, "honest", "digits:shard=0/4,dirichlet=0.5",
                            devices=4, task_id=task_id, log=tmp_path / "agent.log",
                            env={"FEDCOORD_ENROLLMENT_TOKEN": honest})

        # Enrollment: no token, a forged token, and the attacker's third key are refused.
        nobody = RogueDevice(coordinator.target, "no-token", enroll=False)
        code, msg = status_of(lambda: nobody.enroll())
        assert code == grpc.StatusCode.PERMISSION_DENIED and "enrollment token" in msg
        code, msg = status_of(lambda: nobody.enroll(attacker[:-4] + "AAAA"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "unknown enrollment token" in msg
        sybils = [RogueDevice(coordinator.target, f"sybil{i}", enrollment_token=attacker)
                  for i in range(2)]
        extra = RogueDevice(coordinator.target, "sybil2", enroll=False)
        code, msg = status_of(lambda: extra.enroll(attacker))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "2 device(s) already" in msg

        # A key never enrolled cannot check in.
        code, msg = status_of(lambda: nobody.stub.CheckIn(nobody.check_in_request(task_id)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not enrolled" in msg

        # Impersonation: an enrolled attacker claims an honest device's id with its own key.
        with coordinator.admin() as admin:
            deadline = time.monotonic() + 60
            while len(admin.list_devices()) < 6:
                assert time.monotonic() < deadline, "the honest devices never enrolled"
                time.sleep(0.2)
            victim = next(d.device_id for d in admin.list_devices()
                          if d.device_id not in {s.device_id for s in sybils})
        forged = sybils[0].check_in_request(task_id, device_id=victim)
        code, msg = status_of(lambda: sybils[0].stub.CheckIn(forged))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not the one derived" in msg

        # Replay: the same signed request twice.
        once = sybils[1].check_in_request(task_id)
        sybils[1].stub.CheckIn(once)
        code, msg = status_of(lambda: sybils[1].stub.CheckIn(once))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "replayed" in msg

        # Flooding: past the device's rate, RESOURCE_EXHAUSTED says when to come back.
        flood = sybils[0]
        for _ in range(10):
            try:
                flood.stub.CheckIn(flood.check_in_request(task_id))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                retry = dict(exc.trailing_metadata() or ())
                assert 0 < int(retry["retry-after-ms"]) <= 1000
                break
        else:
            raise AssertionError("ten check-ins in a row were never rate limited")

        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=180)
        assert task.state == "completed", coordinator.log_text()
        # Started for this task (--task), the agent ends on its own once the task has (a
        # SIGTERM sent while it was already exiting once killed it: -15).
        try:
            assert agent.wait(timeout=60) == 0
        finally:
            stop_all([agent])
        for rogue in (nobody, extra, *sybils):
            rogue.close()
    finally:
        coordinator.stop()


@pytest.fixture(scope="module")
def first_token_coordinator(tmp_path_factory: pytest.TempPathFactory
                            ) -> Iterator[tuple[CoordinatorProcess, str]]:
    """A coordinator started on a database whose first admin token ``fedctl tokens create
    --db`` wrote (returned beside it), under open enrollment limited to 1/s, burst 10, per
    address. Two tests look at it, each at what the other leaves alone (admin tokens,
    enrollments): a coordinator process costs seconds of start-up (torch)."""
    coordinator = CoordinatorProcess(tmp_path_factory.mktemp("first-token"))
    made = fedctl("tokens", "create", "--role", "admin", "--db", coordinator.db_url)
    assert made.returncode == 0, made.stderr
    coordinator.start(["--rate-limit", "peer-enroll=1/10"])
    try:
        yield coordinator, made.stdout.strip()
    finally:
        coordinator.stop()


def test_enrollments_from_one_address_are_rate_limited_under_open_enrollment(
    first_token_coordinator: tuple[CoordinatorProcess, str],
) -> None:
    """The Sybil capture of the outside testing (300 ids from one client) under the open
    policy: one address enrolls at its rate, the rest is told when to come back."""
    coordinator, _ = first_token_coordinator
    enrolled = refused = 0
    rogue = RogueDevice(coordinator.target, "sybil", enroll=False)
    for _ in range(300):
        rogue.key = DeviceKey.generate()
        try:
            rogue.enroll()
            enrolled += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
            refused += 1
    rogue.close()
    assert 10 <= enrolled <= 20 and enrolled + refused == 300


def test_a_revoked_device_is_refused_at_its_next_request(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    with coordinator.admin() as admin:
        task_id = admin.create_task(load_task_file(write_task(
            tmp_path / "t.yaml", rounds=1, clients_per_round=1, min_reports=1,
            selection_window_s=0.2))).task_id
    rogue = RogueDevice(coordinator.target, "to-revoke")
    try:
        rogue.join(task_id)
        revoked = fedctl("devices", "revoke", rogue.device_id, "--coordinator",
                         coordinator.target)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
        code, msg = status_of(lambda: rogue.upload(rogue.zero_update()))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in msg
        code, msg = status_of(lambda: rogue.stub.CheckIn(rogue.check_in_request(task_id)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in msg
        code, msg = status_of(lambda: rogue.enroll())
        assert code == grpc.StatusCode.PERMISSION_DENIED and "revoked" in msg
        audit = fedctl("audit", "--json", "--coordinator", coordinator.target)
        assert audit.returncode == 0
        assert f'"action": "RevokeDevice", "target": "{rogue.device_id}"' in audit.stdout
        assert f'"action": "Enroll", "target": "{rogue.device_id}"' in audit.stdout
        with coordinator.admin() as admin:
            admin.cancel_task(task_id)
    finally:
        rogue.close()


def _call(channel: grpc.Channel, method: str, token: str | None) -> grpc.StatusCode:
    """The status of an admin RPC with an empty request (OK when it succeeds)."""
    request_cls = getattr(admin_pb2, f"{method}Request", None) or getattr(
        admin_pb2, f"Admin{method}Request")
    request = request_cls(api_version=API_VERSION)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    path = f"/fedcoord.v1.AdminService/{method}"
    try:
        if method == "DownloadModel":
            stream = channel.unary_stream(path, request_serializer=request_cls.SerializeToString,
                                          response_deserializer=None)
            for _ in stream(request, timeout=30, metadata=metadata):
                pass
        else:
            channel.unary_unary(path, request_serializer=request_cls.SerializeToString,
                                response_deserializer=None)(request, timeout=30,
                                                            metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_admin_rpc_needs_credentials_and_its_role(coordinator: CoordinatorProcess) -> None:
    with coordinator.admin() as admin:
        tokens = {role: admin.create_token(role.label, f"matrix {role.label}")[1]
                  for role in Role}
        revoked_id, revoked = admin.create_token("admin", "to revoke")
        admin.revoke_token(revoked_id.token_id)
    channel = grpc.insecure_channel(coordinator.target)
    try:
        service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
        assert {m.name for m in service.methods} == set(REQUIRED_ROLE)  # none left unlisted
        for method in sorted(REQUIRED_ROLE):
            for bad in (None, "nonsense", "fct_000000000000_" + "A" * 43, revoked):
                assert _call(channel, method, bad) == grpc.StatusCode.UNAUTHENTICATED, \
                    (method, bad)
            for role, token in tokens.items():
                code = _call(channel, method, token)
                if role < REQUIRED_ROLE[method]:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (method, role)
                else:  # authorized: whatever the empty request then gets, not a refusal
                    assert code not in (grpc.StatusCode.PERMISSION_DENIED,
                                        grpc.StatusCode.UNAUTHENTICATED), (method, role, code)
    finally:
        channel.close()


def test_the_cli_says_in_one_line_what_credentials_are_needed(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    no_token = {k: v for k, v in ENV.items() if k != "FEDCOORD_TOKEN"}
    no_token["FEDCOORD_TOKEN_FILE"] = str(tmp_path / "absent")
    line = one_line_error(fedctl("task", "list", "--coordinator", coordinator.target,
                                 env=no_token))
    assert "UNAUTHENTICATED" in line and "--token" in line

    created = fedctl("tokens", "create", "--role", "viewer", "--label", "ci", "--coordinator",
                     coordinator.target)
    assert created.returncode == 0, created.stderr
    viewer = created.stdout.strip()
    assert viewer.startswith("fct_") and "shown once" in created.stderr
    who = fedctl("whoami", "--token", viewer, "--coordinator", coordinator.target)
    assert who.returncode == 0 and "(viewer)" in who.stdout
    task_file = write_task(tmp_path / "t.yaml")
    line = one_line_error(fedctl("task", "launch", str(task_file), "--token", viewer,
                                 "--coordinator", coordinator.target))
    assert "PERMISSION_DENIED" in line and "needs the role launcher" in line

    # A token file others may read is refused, naming the fix.
    loose = tmp_path / "token"
    loose.write_text(viewer)
    os.chmod(loose, 0o644)
    env = dict(no_token, FEDCOORD_TOKEN_FILE=str(loose))
    assert "chmod 600" in one_line_error(fedctl("task", "list", "--coordinator",
                                                coordinator.target, env=env))
    os.chmod(loose, 0o600)
    assert fedctl("task", "list", "--coordinator", coordinator.target, env=env).returncode == 0

    audit = fedctl("audit", "--json", "--coordinator", coordinator.target)
    assert '"action": "CreateToken"' in audit.stdout
    assert '"outcome": "PERMISSION_DENIED"' in audit.stdout  # refusals are audited too
    assert viewer not in audit.stdout and ADMIN_TOKEN not in coordinator.log_text()


def test_the_first_admin_token_can_be_written_into_the_database(
    first_token_coordinator: tuple[CoordinatorProcess, str],
) -> None:
    coordinator, token = first_token_coordinator
    with AdminClient(coordinator.target, token=token) as admin:
        assert admin.whoami()[1] == "admin"
