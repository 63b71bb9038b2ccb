"""``fedctl cluster up --replicas M --aggregators N``: a local cluster to try coordinator
replicas and aggregator shards with: N ``fedctl aggregator serve`` processes and M
``fedctl coordinator serve --replica`` processes on one database and one model store, every
replica sending the uploads of sharded tasks to the N shards, on consecutive ports (the
replicas first), supervised until Ctrl-C (or SIGTERM).

It prints each replica's address, pid and log, the agent and admin command lines, and a line
whenever a replica starts to lead. A replica that exits (``kill -9`` its pid to see a
standby take over; a deposed leader exits by itself) is started again as a standby; one that
exits three times in a row before serving, or because it could not take over once elected
(exit status 3: its recovery fails, and so would every replica's), stops the cluster. Without
``--db`` the database is a SQLite file in ``--dir`` (one machine); give a PostgreSQL URL to
try what production runs. A shard that exits is started again (``kill -9`` one mid-round to
see its group lost and the round commit from the others, or fail and be redone); the master
key is ``DIR/shard.key``, made on the first start, and shard I's own key
``DIR/aggregator-I.key``, derived from it at each start.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LEADS = re.compile(r"fedcoord coordinator leads \(lease epoch (\d+)\)")
#: A replica that exits this soon after starting, before serving, stops the cluster (a bad
#: setting would otherwise be restarted for ever).
_START_TIMEOUT_S = 300.0
#: ``--lease-ttl``'s default (``coordinator serve --replica`` and ``cluster up``).
LEASE_TTL_S = 3.0


def add_lease_ttl(parser: Any, *, help_prefix: str = "") -> None:
    """``--lease-ttl SECONDS``, as ``coordinator serve`` and ``cluster up`` take it; check the
    value with :func:`check_lease_ttl`."""
    parser.add_argument("--lease-ttl", type=float, default=LEASE_TTL_S, metavar="SECONDS",
                        help=f"{help_prefix}a killed leader is replaced after about this long")


def check_lease_ttl(seconds: float) -> None:
    """CliError (exit status 2) unless ``seconds`` is a lease ttl a replica can run with."""
    from fedctl.errors import CliError

    if not 0.5 <= seconds <= 600:
        raise CliError(f"--lease-ttl {seconds:g}: expected seconds from 0.5 to 600",
                       exit_code=2)


def register(subparsers: Any) -> None:
    """Adds ``cluster up`` to ``fedctl``'s subparsers (imports nothing heavy)."""
    cluster = subparsers.add_parser("cluster", help="a local cluster of coordinator replicas "
                                                    "and aggregator shards")
    actions = cluster.add_subparsers(dest="action", required=True)
    up = actions.add_parser(
        "up", help="start M coordinator replicas on one database and supervise them until "
                   "Ctrl-C",
        description="Starts M `fedctl coordinator serve --replica` processes on one database "
                    "and one model store, on consecutive ports, and supervises them until "
                    "Ctrl-C: a replica that exits (kill -9 the leader to watch a standby take "
                    "over) is started again as a standby.")
    up.add_argument("--replicas", type=int, default=2, metavar="M",
                    help="coordinator processes (one leads, the others stand by)")
    up.add_argument("--dir", type=Path, default=Path("fedcoord-cluster"), metavar="DIR",
                    help="where the model store, the logs, the admin token and (without --db) "
                         "the SQLite database go")
    up.add_argument("--db", metavar="URL",
                    help="the shared database (default: sqlite:///DIR/coordinator.db)")
    up.add_argument("--host", default="127.0.0.1", help="address every replica binds")
    up.add_argument("--port", type=int, default=7070,
                    help="the first replica's port; the others take the next ones")
    up.add_argument("--aggregators", type=int, default=0, metavar="N",
                    help="aggregator shards (fedctl aggregator serve) that take the uploads "
                         "of sharded tasks; 0: uploads go to the leader")
    add_lease_ttl(up)
    up.set_defaults(func=cmd_cluster_up)


@dataclass
class _Replica:
    index: int
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: Restarts in a row that exited before serving or failed to take over once elected.
    failed_starts: int = 0
    seen_leading: set[str] = field(default_factory=set)

    @property
    def port_file(self) -> Path:
        return self.log.with_suffix(".port")


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from coordinator.replication import PROMOTION_FAILED_EXIT
    from fedctl.errors import CliError

    if not 1 <= args.replicas <= 16:
        raise CliError(f"--replicas {args.replicas}: expected 1 to 16", exit_code=2)
    check_lease_ttl(args.lease_ttl)
    if not 0 <= args.aggregators <= 64:
        raise CliError(f"--aggregators {args.aggregators}: expected 0 to 64", exit_code=2)
    processes = args.replicas + args.aggregators
    if not 0 < args.port <= 65535 - processes + 1:
        raise CliError(f"--port {args.port}: the {processes} processes need ports up to "
                       f"{args.port + processes - 1}, at most 65535", exit_code=2)
    directory: Path = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    shards = [_Replica(i, args.port + args.replicas + i, directory / f"aggregator-{i}.log")
              for i in range(args.aggregators)]
    key_file = directory / "shard.key"
    if shards and not key_file.exists():
        from fedctl.aggregator import write_new_key

        write_new_key(key_file)
    if shards:
        from core.shards import derive_shard_key, parse_key
        from fedctl.aggregator import write_new_key

        master = parse_key(key_file.read_bytes())
        for r in shards:  # each shard holds its own key only
            shard_key = directory / f"aggregator-{r.index}.key"
            shard_key.unlink(missing_ok=True)
            write_new_key(shard_key, derive_shard_key(master, r.index))
    shard_flags = [flag for r in shards
                   for flag in ("--aggregator", f"{args.host}:{r.port}")]
    if shards:
        shard_flags += ["--shard-key-file", str(key_file)]
    db = args.db or f"sqlite:///{directory / 'coordinator.db'}"
    token_file = directory / "admin.token"
    replicas = [_Replica(i, args.port + i, directory / f"replica-{i}.log")
                for i in range(args.replicas)]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def start(r: _Replica, *, bootstrap: bool) -> None:
        r.port_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "fedctl", "coordinator", "serve", "--replica",
                   "--db", db, "--store", str(directory / "store"), "--host", args.host,
                   "--port", str(r.port), "--port-file", str(r.port_file),
                   "--lease-ttl", str(args.lease_ttl), *shard_flags]
        if bootstrap:  # one replica registers the first admin token: two would race
            command += ["--admin-token-file", str(token_file)]
        with open(r.log, "ab") as log:
            r.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        r.started = time.monotonic()

    def start_shard(r: _Replica) -> None:
        r.port_file.unlink(missing_ok=True)
        command = [sys.executable, "-m", "fedctl", "aggregator", "serve", "--index",
                   str(r.index), "--key-file", str(directory / f"aggregator-{r.index}.key"),
                   "--host", args.host,
                   "--port", str(r.port), "--port-file", str(r.port_file),
                   "--spool-dir", str(directory / f"aggregator-{r.index}-spool")]
        with open(r.log, "ab") as log:
            r.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        r.started = time.monotonic()

    def wait_serving(r: _Replica, what: str = "replica") -> None:
        assert r.proc is not None
        while not r.port_file.exists():
            if r.proc.poll() is not None or time.monotonic() - r.started > _START_TIMEOUT_S:
                tail = r.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise CliError(f"{what} {r.index} did not start (log {r.log}): "
                               + " | ".join(tail))
            if stop.wait(0.05):
                return

    try:
        for r in shards:
            start_shard(r)
        for r in shards:
            wait_serving(r, "aggregator")
        for r in replicas:
            start(r, bootstrap=r.index == 0)
        for r in replicas:
            wait_serving(r)
        if stop.is_set():
            return 130
        for r in shards:
            assert r.proc is not None
            print(f"aggregator {r.index}: {args.host}:{r.port} pid {r.proc.pid} log {r.log}",
                  flush=True)
        addresses = ",".join(f"{args.host}:{r.port}" for r in replicas)
        for r in replicas:
            assert r.proc is not None
            print(f"replica {r.index}: {args.host}:{r.port} pid {r.proc.pid} log {r.log}",
                  flush=True)
        print(f"database {db}, model store {directory / 'store'}\n"
              f"agents: fedctl agent run --coordinator {addresses} --data ...\n"
              f"admin:  FEDCOORD_TOKEN=$(cat {token_file}) fedctl task list "
              f"--coordinator {args.host}:{args.port}\n"
              "kill -9 the leader's pid to watch a standby take over; Ctrl-C stops the "
              "cluster", flush=True)
        while not stop.wait(0.2):
            for r in shards:
                assert r.proc is not None
                if r.proc.poll() is not None:
                    served = r.port_file.exists()
                    r.failed_starts = 0 if served else r.failed_starts + 1
                    if r.failed_starts >= 3:
                        tail = r.log.read_text(errors="replace").strip().splitlines()[-3:]
                        raise CliError(f"aggregator {r.index} exits before serving, 3 times in "
                                       f"a row (log {r.log}): " + " | ".join(tail))
                    print(f"aggregator {r.index} (pid {r.proc.pid}) exited with "
                          f"{r.proc.returncode}; starting it again (its rounds in progress "
                          "are lost)", flush=True)
                    start_shard(r)
                    print(f"aggregator {r.index}: pid {r.proc.pid}", flush=True)
            for r in replicas:
                _report_leading(r)
                assert r.proc is not None
                if r.proc.poll() is not None:
                    took_over = r.proc.returncode != PROMOTION_FAILED_EXIT
                    served = r.port_file.exists() and took_over
                    r.failed_starts = 0 if served else r.failed_starts + 1
                    if r.failed_starts >= 3:
                        tail = r.log.read_text(errors="replace").strip().splitlines()[-3:]
                        raise CliError(f"replica {r.index} exits before serving or fails to "
                                       f"take over once elected, 3 times in a row (log "
                                       f"{r.log}): " + " | ".join(tail))
                    why = "" if took_over else " (elected, it could not take over)"
                    print(f"replica {r.index} (pid {r.proc.pid}) exited with "
                          f"{r.proc.returncode}{why}; starting it again as a standby",
                          flush=True)
                    start(r, bootstrap=False)
                    print(f"replica {r.index}: pid {r.proc.pid}", flush=True)
        print("stopping the cluster", flush=True)
        return 0
    finally:
        _stop_all(replicas + shards)


def _report_leading(r: _Replica) -> None:
    try:
        text = r.log.read_text(errors="replace")
    except OSError:
        return
    for match in _LEADS.finditer(text):
        if match.group(0) not in r.seen_leading:
            r.seen_leading.add(match.group(0))
            print(f"replica {r.index} leads (lease epoch {match.group(1)})", flush=True)


def _stop_all(replicas: list[_Replica]) -> None:
    running = [r.proc for r in replicas if r.proc is not None and r.proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    for proc in running:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
