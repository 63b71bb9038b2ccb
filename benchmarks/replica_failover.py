"""How long a standby coordinator replica takes to lead after the leader is kill -9'd.

Two ``fedctl coordinator serve --replica`` processes on one PostgreSQL database and one model
store, with one running task (so the new leader recovers it: loads its model, fails the open
round, opens the next). Repeatedly: kill -9 the leader, time until the standby prints that it
leads (it has taken the lease, the model store, recovered the task and started the rounds),
then start the killed one again as the new standby. Prints one JSON line: every take-over
time, their median, min and max, the lease ttl, and the machine's load before and after.

    python benchmarks/replica_failover.py [--kills 5] [--lease-ttl 3] [--db URL]

Without ``--db`` it uses ``$FEDCOORD_TEST_POSTGRES_URL`` (a schema of its own), else a
throw-away cluster (scripts/test-postgres.sh; a PostgreSQL server must be installed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
FEDCTL = [sys.executable, "-m", "fedctl"]
LEADS = re.compile(r"fedcoord coordinator leads \(lease epoch (\d+)\)")
TASK = """\
name: failover
model: {architecture: logistic_regression, arguments: {input_dim: 64, num_classes: 10}}
rounds: 1000
clients_per_round: 4
min_reports: 4
round_deadline_s: 600
selection_window_s: 1.0
local: {epochs: 1, batch_size: 16, optimizer: sgd, learning_rate: 0.1}
server: {kind: fedavg, learning_rate: 1.0}
"""


def _engine(url: str) -> sa.Engine:
    parsed = sa.make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed)


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    """A fresh schema ``bench_replicas`` in ``url`` (else a throw-away cluster's)."""
    url = url or os.environ.get("FEDCOORD_TEST_POSTGRES_URL") or None
    cluster = None
    if url is None:
        cluster = Path(tempfile.mkdtemp(prefix="fedcoord-pg-")) / "pg"
        url = subprocess.run([str(REPO / "scripts" / "test-postgres.sh"), "start", str(cluster)],
                             capture_output=True, text=True, check=True).stdout.strip()
        if not url:
            sys.exit("no PostgreSQL server installed: give --db URL")
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text('DROP SCHEMA IF EXISTS "bench_replicas" CASCADE'))
            conn.execute(sa.text('CREATE SCHEMA "bench_replicas"'))
    finally:
        engine.dispose()
    try:
        yield sa.make_url(url).update_query_dict(
            {"options": "-csearch_path=bench_replicas"}).render_as_string(hide_password=False)
    finally:
        if cluster is not None:
            subprocess.run([str(REPO / "scripts" / "test-postgres.sh"), "stop", str(cluster)],
                           capture_output=True)
            shutil.rmtree(cluster.parent, ignore_errors=True)


class Replica:
    def __init__(self, name: str, workdir: Path, db_url: str, ttl_s: float,
                 token_file: Path | None, env: dict[str, str]) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        port_file = workdir / f"{name}.port"
        self.proc = subprocess.Popen(
            [*FEDCTL, "coordinator", "serve", "--replica", "--lease-ttl", str(ttl_s),
             "--db", db_url, "--store", str(workdir / "store"), "--port", "0",
             "--port-file", str(port_file),
             *(["--admin-token-file", str(token_file)] if token_file else [])],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if self.proc.poll() is not None:
                sys.exit(f"replica {name} exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                sys.exit(f"replica {name} did not start in 300 s")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{int(port_file.read_text())}"

    def leads(self) -> bool:
        return bool(LEADS.search(self.log.read_text(errors="replace")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_leader(replicas: list[Replica], timeout_s: float = 60) -> Replica:
    deadline = time.monotonic() + timeout_s
    while True:
        for r in replicas:
            if r.proc.poll() is None and r.leads():
                return r
        if time.monotonic() > deadline:
            sys.exit("no replica leads")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--lease-ttl", type=float, default=3.0)
    parser.add_argument("--db", help="a PostgreSQL URL (a schema bench_replicas is made in it)")
    args = parser.parse_args()

    from coordinator.security.service import write_secret_file
    from core.security.bearer import new_secret
    from core.taskspec import load_task_file
    from fedctl.admin import AdminClient

    workdir = Path(tempfile.mkdtemp(prefix="fedcoord-failover-"))
    token = new_secret("fct").secret
    token_file = workdir / "admin.token"
    write_secret_file(token_file, token)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()[0]
    times: list[float] = []
    with database(args.db) as url:
        replicas = [Replica("r0", workdir, url, args.lease_ttl, token_file, env),
                    Replica("r1", workdir, url, args.lease_ttl, None, env)]
        try:
            leader = wait_leader(replicas)
            (workdir / "task.yaml").write_text(TASK)
            with AdminClient(leader.target, token=token) as admin:
                admin.create_task(load_task_file(workdir / "task.yaml"))
            for kill in range(args.kills):
                standby = next(r for r in replicas if r is not leader)
                time.sleep(args.lease_ttl)  # steady state: renewals and polls running
                leader.proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                leader.proc.wait()
                while not standby.leads():
                    if standby.proc.poll() is not None:
                        sys.exit(f"the standby exited: {standby.log.read_text()}")
                    time.sleep(0.005)
                times.append(round(time.monotonic() - killed_at, 3))
                replicas.remove(leader)
                replicas.append(Replica(f"r{kill + 2}", workdir, url, args.lease_ttl, None,
                                        env))
                leader = standby
        finally:
            for r in replicas:
                r.stop()
    print(json.dumps({
        "benchmark": "replica_failover", "kills": len(times), "lease_ttl_s": args.lease_ttl,
        "takeover_s": {"median": statistics.median(times), "min": min(times),
                       "max": max(times), "all": times},
        "load_1m_before": round(load_before, 2), "load_1m_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
