"""Two coordinator replicas on one PostgreSQL database and one model store: kill -9 the leader
after some rounds committed; the standby takes over within seconds, the task completes, every
version committed before the kill is still there (file and record), and the versions are
consecutive, each round committed once.

Real processes (``fedctl coordinator serve --replica``, ``fedctl agent run`` given both
addresses) and a real PostgreSQL: the one `.ci/run` started (``FEDCOORD_TEST_POSTGRES_URL``;
a schema of this test's own), else a throw-away cluster started here as `.ci/run` does
(scripts/test-postgres.sh); skipped, saying why, where no PostgreSQL server is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from harness import (
    ADMIN_TOKEN,
    ADMIN_TOKEN_FILE,
    ENV,
    FEDCTL,
    consecutive_free_ports,
    start_agent,
    stop_all,
    wait_for_task,
    write_task,
)

from fedctl.admin import AdminClient, AdminError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
#: Short, so the test is: a killed leader is replaced about this long after its last renewal.
LEASE_TTL_S = 2.0
LEADS = re.compile(r"fedcoord coordinator leads \(lease epoch (\d+)\)")


def _engine(url: str) -> sa.Engine:
    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database of this test's own: a fresh schema in `.ci/run`'s scratch database, else
    a throw-away cluster."""
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed (fedcoord's postgres extra)")
    url = os.environ.get("FEDCOORD_TEST_POSTGRES_URL", "")
    cluster: Path | None = None
    if not url:
        cluster = Path(tempfile.mkdtemp(prefix="fedcoord-pg-")) / "pg"
        started = subprocess.run([str(REPO / "scripts" / "test-postgres.sh"), "start",
                                  str(cluster)], capture_output=True, text=True, timeout=120)
        url = started.stdout.strip()
        if started.returncode != 0 or not url:
            pytest.skip("no PostgreSQL server to start a throw-away cluster with "
                        f"(scripts/test-postgres.sh: {started.stderr.strip()[-200:] or 'none'})")
    schema = f"replicas_{re.sub(r'[^a-z0-9_]', '_', os.environ.get('PYTEST_XDIST_WORKER', 'main'))}"
    admin = _engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    finally:
        admin.dispose()
    yield sa.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"}
                                             ).render_as_string(hide_password=False)
    if cluster is not None:
        subprocess.run([str(REPO / "scripts" / "test-postgres.sh"), "stop", str(cluster)],
                       capture_output=True, timeout=60)
        shutil.rmtree(cluster.parent, ignore_errors=True)


@dataclass
class Replica:
    """``fedctl coordinator serve --replica`` on the shared database and model store."""

    name: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    port: int = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin(self) -> AdminClient:
        return AdminClient(self.target, token=ADMIN_TOKEN)

    def leads(self) -> bool:
        return bool(LEADS.search(self.log.read_text(errors="replace")))

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def start_replica(name: str, workdir: Path, db_url: str, *, bootstrap: bool) -> Replica:
    """``bootstrap``: this replica registers the tests' admin token (one replica does: two
    registering the first token at once would race)."""
    port_file = workdir / f"{name}.port"
    token = ["--admin-token-file", str(ADMIN_TOKEN_FILE)] if bootstrap else []
    proc = subprocess.Popen(
        [*FEDCTL, "coordinator", "serve", "--replica", "--lease-ttl", str(LEASE_TTL_S),
         "--db", db_url, "--store", str(workdir / "store"), "--port", "0",
         "--port-file", str(port_file), "--retry-after-max", "1", *token],
        stdout=open(workdir / f"{name}.log", "wb"), stderr=subprocess.STDOUT, env=ENV,  # noqa: SIM115
    )
    return Replica(name, workdir, proc)


def wait_started(replica: Replica, timeout_s: float = 180) -> None:
    port_file = replica.workdir / f"{replica.name}.port"
    deadline = time.monotonic() + timeout_s
    while not port_file.exists():
        if replica.proc.poll() is not None:
            raise RuntimeError(f"replica {replica.name} exited: {replica.log.read_text()}")
        assert time.monotonic() < deadline, f"replica {replica.name} did not start"
        time.sleep(0.05)
    replica.port = int(port_file.read_text())


def committed_versions(db_url: str, store: Path, task_id: str) -> dict[int, str]:
    """version -> sha256 of its file, for every version the database records (each file
    checked against its record)."""
    engine = _engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT version, path, sha256 FROM model_versions WHERE task_id = :t"),
                {"t": task_id}).all()
    finally:
        engine.dispose()
    out = {}
    for v, path, recorded in rows:
        actual = hashlib.sha256((store / path).read_bytes()).hexdigest()
        assert actual == recorded, f"model v{v} on disk differs from its record"
        out[int(v)] = actual
    return out


def test_the_standby_takes_over_a_killed_leader_without_losing_or_repeating_a_version(
        postgres_url: str, tmp_path: Path) -> None:
    rounds = 4
    replicas = [start_replica("r1", tmp_path, postgres_url, bootstrap=True),
                start_replica("r2", tmp_path, postgres_url, bootstrap=False)]
    agents: list[subprocess.Popen[bytes]] = []
    try:
        for r in replicas:
            wait_started(r)
        deadline = time.monotonic() + 30
        while not any(r.leads() for r in replicas):
            assert time.monotonic() < deadline, "no replica took the lease"
            time.sleep(0.05)
        leader, standby = replicas if replicas[0].leads() else replicas[::-1]
        task_file = write_task(tmp_path / "t.yaml", rounds=rounds, clients_per_round=3,
                               min_reports=3, selection_window_s=0.5, round_deadline_s=20)
        from core.taskspec import load_task_file

        spec = load_task_file(task_file)
        # The standby refuses changes; once it has seen the lease (its first poll may come
        # after the leader's election), its refusal names the leader.
        deadline = time.monotonic() + 15
        while True:
            with standby.admin() as admin, pytest.raises(AdminError) as refused:
                admin.create_task(spec)
            assert refused.value.code == "UNAVAILABLE", str(refused.value)
            if leader.target in str(refused.value):
                break
            assert "no leader is known yet" in str(refused.value), str(refused.value)
            assert time.monotonic() < deadline, f"the standby never named the leader: " \
                                                f"{refused.value}"
            time.sleep(0.1)
        with leader.admin() as admin:
            task_id = admin.create_task(spec).task_id
        # The standby first: the agent moves on to the leader when it is refused.
        agents.append(start_agent(f"{standby.target},{leader.target}", "rep",
                                  "digits:shard=0/4,dirichlet=0.5", devices=4,
                                  task_id=task_id, log=tmp_path / "agent.log"))
        with standby.admin() as admin:  # reads are served by the standby, from the database
            deadline = time.monotonic() + 120
            while (task := admin.get_task(task_id)).rounds_committed < 2:
                assert task.state == "running", f"task ended before the kill: {task.state}"
                assert time.monotonic() < deadline, "two rounds did not commit in 120 s"
                time.sleep(0.05)
        leader.kill9()
        killed_at = time.monotonic()
        before = committed_versions(postgres_url, tmp_path / "store", task_id)
        assert len(before) >= 3  # v0 and at least v1, v2

        while not standby.leads():
            assert standby.proc.poll() is None, standby.log.read_text()
            assert time.monotonic() - killed_at < 30, "the standby did not take over in 30 s"
            time.sleep(0.02)
        takeover_s = time.monotonic() - killed_at
        print(json.dumps({"replica_takeover_s": round(takeover_s, 2),
                          "lease_ttl_s": LEASE_TTL_S, "load_1m": os.getloadavg()[0]}))
        assert takeover_s < LEASE_TTL_S + 8, f"took over after {takeover_s:.1f} s"

        with standby.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=120)
            listed = admin.list_rounds(task_id)
        assert task.state == "completed", standby.log.read_text()[-3000:]
        stop_all(agents)
    finally:
        stop_all(agents)
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r.proc.wait(timeout=15)
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()

    after = committed_versions(postgres_url, tmp_path / "store", task_id)
    assert {v: after[v] for v in before} == before, "a version committed before the kill changed"
    assert sorted(after) == list(range(rounds + 1)), "versions are consecutive, none repeated"
    committed = sorted(r.round_number for r in listed if r.state == "committed")
    assert committed == list(range(1, rounds + 1)), "each round committed exactly once"


def test_cluster_up_runs_replicas_and_restarts_a_killed_leader_as_a_standby(
        tmp_path: Path) -> None:
    """`fedctl cluster up --replicas 2` (SQLite: one machine): one replica leads; kill -9 it
    and the other leads while the killed one comes back as a standby; Ctrl-C stops all."""
    port = consecutive_free_ports(2)
    out = tmp_path / "cluster.out"
    cluster = subprocess.Popen(
        [*FEDCTL, "cluster", "up", "--replicas", "2", "--dir", str(tmp_path / "c"),
         "--port", str(port), "--lease-ttl", "1"],
        stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=ENV)  # noqa: SIM115

    def wait_line(pattern: str, timeout_s: float = 180) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            text = out.read_text(errors="replace")
            if (found := re.search(pattern, text)) is not None:
                return found
            assert cluster.poll() is None, text
            assert time.monotonic() < deadline, f"no {pattern!r} in: {text}"
            time.sleep(0.05)

    try:
        first = wait_line(r"replica (\d) leads \(lease epoch 1\)").group(1)
        pid = int(wait_line(rf"replica {first}: \S+ pid (\d+)").group(1))
        os.kill(pid, signal.SIGKILL)
        second = wait_line(r"replica (\d) leads \(lease epoch 2\)", timeout_s=30).group(1)
        assert second != first
        wait_line(rf"replica {first} \(pid {pid}\) exited with -9; starting it again")
    finally:
        cluster.send_signal(signal.SIGINT)
        code = cluster.wait(timeout=60)
    assert code == 0, out.read_text()
    assert "stopping the cluster" in out.read_text()


def test_a_leader_that_lost_its_lease_exits_saying_why(tmp_path: Path) -> None:
    """Another replica took the lease while this one stalled: the deposed leader stops at
    once, exit code 1, naming the reason (a supervisor starts it again as a standby)."""
    import sqlite3

    db = tmp_path / "c.db"
    replica = start_replica("r", tmp_path, f"sqlite:///{db}", bootstrap=False)
    try:
        wait_started(replica)
        deadline = time.monotonic() + 30
        while not replica.leads():
            assert time.monotonic() < deadline, replica.log.read_text()
            time.sleep(0.05)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE coordinator_leases SET epoch = epoch + 1, holder = 'other', "
                         "address = 'elsewhere:7070'")

        code = replica.proc.wait(timeout=30)
    finally:
        if replica.proc.poll() is None:
            replica.proc.kill()
            replica.proc.wait()
    assert code == 1
    assert ("coordinator: this replica stopped leading: the leader lease (epoch 1) has passed "
            "to another replica") in replica.log.read_text()


def test_replicas_that_cannot_recover_once_elected_stop_the_cluster_instead_of_flapping(
        tmp_path: Path) -> None:
    """A running task's model file is gone: every replica elected fails its recovery. Each
    releases the lease and exits 3 saying why, and `fedctl cluster up` stops after three
    such exits in a row (before: each took the lease, failed and was restarted, for ever)."""
    directory = tmp_path / "c"
    port = consecutive_free_ports(1)
    out = tmp_path / "cluster.out"
    cluster = subprocess.Popen(
        [*FEDCTL, "cluster", "up", "--replicas", "1", "--dir", str(directory),
         "--port", str(port), "--lease-ttl", "1"],
        stdout=open(out, "wb"), stderr=subprocess.STDOUT, env=ENV)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 180
        while "replica 0 leads" not in out.read_text(errors="replace"):
            assert cluster.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        started = re.search(r"replica 0: \S+ pid (\d+)", out.read_text())
        assert started is not None
        pid = int(started.group(1))
        from core.taskspec import load_task_file

        token = (directory / "admin.token").read_text().strip()
        with AdminClient(f"127.0.0.1:{port}", token=token) as admin:
            admin.create_task(load_task_file(write_task(tmp_path / "t.yaml")))
        os.kill(pid, signal.SIGKILL)
        for model in (directory / "store").rglob("*.safetensors"):
            model.unlink()

        code = cluster.wait(timeout=240)
    finally:
        if cluster.poll() is None:
            cluster.send_signal(signal.SIGINT)
            cluster.wait(timeout=60)
    text = out.read_text()
    assert code == 1, text
    assert "exited with 3 (elected, it could not take over)" in text
    assert "fails to take over once elected, 3 times in a row" in text
    assert "recovering the tasks failed" in (directory / "replica-0.log").read_text()
