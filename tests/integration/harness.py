"""Real processes: a coordinator on an ephemeral port with a SQLite file, and agent
processes, all started through the `fedctl` entry point as a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coordinator.security.service import write_secret_file
from core.security.bearer import new_secret
from core.tls import ClientTls
from fedctl.admin import AdminClient, AdminError
from protos.fedcoord.v1 import admin_pb2

FEDCTL = [sys.executable, "-m", "fedctl"]
_SESSION = Path(tempfile.mkdtemp(prefix="fedcoord-it-"))
#: Every coordinator of the tests registers this admin token (``--admin-token-file``), and
#: every fedctl the tests run presents it (``FEDCOORD_TOKEN``).
ADMIN_TOKEN = new_secret("fct").secret
ADMIN_TOKEN_FILE = _SESSION / "admin.token"
write_secret_file(ADMIN_TOKEN_FILE, ADMIN_TOKEN)
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           FEDCOORD_TOKEN=ADMIN_TOKEN, FEDCOORD_AGENT_STATE=str(_SESSION / "agents"))
#: Devices told to come back (no task yet, round full, update in) wait at most this long:
#: the 5 s default would make each round of a test wait seconds for nothing.
RETRY_AFTER_MAX_S = 1.0


@dataclass
class CoordinatorProcess:
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    logs: list[Path] = field(default_factory=list)
    #: How :meth:`admin` reaches a coordinator started with ``--tls`` (None: plaintext).
    tls: ClientTls | None = None
    #: The coordinator's working directory (relative paths in task files resolve there).
    cwd: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.workdir}/coordinator.db"

    def start(self, extra: list[str] | None = None) -> None:
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        log = self.workdir / f"coordinator-{self.restarts}.log"
        self.logs.append(log)
        # Restarts reuse the first port so agents find the coordinator again.
        self.proc = subprocess.Popen(
            [*FEDCTL, "coordinator", "serve", "--db", self.db_url,
             "--store", str(self.workdir / "store"), "--port", str(self.port),
             "--port-file", str(port_file), "--admin-token-file", str(ADMIN_TOKEN_FILE),
             "--retry-after-max", str(RETRY_AFTER_MAX_S), *(extra or [])],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=self.cwd,  # noqa: SIM115
        )
        # Seconds of imports (torch) on an idle machine, but a minute was seen to be too
        # little on a loaded one.
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError("coordinator did not start in 180 s")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.restarts += 1

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()  # reaped: no zombie left behind

    def admin(self) -> AdminClient:
        return AdminClient(self.target, tls=self.tls, token=ADMIN_TOKEN)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    c = CoordinatorProcess(tmp_path)
    c.start()
    yield c
    c.stop()


#: The coordinator every module of this worker process shares (see shared_coordinator).
_SHARED: CoordinatorProcess | None = None


def shared_coordinator(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[CoordinatorProcess]:
    """The body of a module-scoped ``coordinator`` fixture, for a module whose tests each make
    their own tasks, devices and tokens and look only at those: one coordinator process (its
    start-up costs seconds of CPU: torch) serves every such module this pytest worker runs,
    one test after the other. At the module's end the tasks it left running are cancelled, so
    the next module's devices are not offered them; a coordinator that died is started again
    for the next module (the test that killed it has failed already).

        @pytest.fixture(scope="module")
        def coordinator(tmp_path_factory):
            yield from shared_coordinator(tmp_path_factory)
    """
    global _SHARED
    if _SHARED is None or _SHARED.proc is None or _SHARED.proc.poll() is not None:
        _SHARED = CoordinatorProcess(tmp_path_factory.mktemp("coordinator"))
        _SHARED.start()
    yield _SHARED
    if _SHARED.proc is not None and _SHARED.proc.poll() is None:
        with _SHARED.admin() as admin:
            for task in admin.list_tasks():
                if task.state == "running":
                    with contextlib.suppress(AdminError):  # it ended meanwhile
                        admin.cancel_task(task.task_id, "the test module that made it ended")


def stop_shared_coordinator() -> None:
    """Stops the worker's shared coordinator (at the end of the session)."""
    global _SHARED
    if _SHARED is not None:
        _SHARED.stop()
        _SHARED = None


def start_agent(target: str, device_id: str, data: str, *, devices: int = 1,
                task_id: str | None = None, extra: list[str] | None = None,
                log: Path | None = None, verbose: bool = False,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    cmd = [*FEDCTL, *(["-v"] if verbose else []), "agent", "run", "--coordinator", target, "--device-id", device_id,
           "--data", data, "--devices", str(devices), "--give-up-after", "60"]
    if task_id:
        cmd += ["--task", task_id]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(cmd + (extra or []), stdout=out, stderr=subprocess.STDOUT,
                            env={**ENV, **(env or {})})


def wait_for_task(client: AdminClient, task_id: str, *, timeout_s: float = 240,
                  until: tuple[str, ...] = ("completed", "failed", "cancelled")
                  ) -> admin_pb2.Task:
    deadline = time.monotonic() + timeout_s
    while True:
        task = client.get_task(task_id)
        if task.state in until:
            return task
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} still {task.state} after {timeout_s} s")
        time.sleep(0.2)


def stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float = 20) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout_s))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()  # reaped: no zombie left behind
            codes.append(-9)
    return codes


FEDCTL_CMD = FEDCTL


def fedctl_at_once(*commands: list[str], env: dict[str, str] | None = None,
                   timeout_s: float = 120) -> list[subprocess.CompletedProcess[str]]:
    """``fedctl ARGS`` for each command, all started together, their results in order (each
    fedctl costs a second or two of imports; read-only commands need not wait in line)."""
    procs = [subprocess.Popen([*FEDCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env or ENV) for args in commands]
    done = []
    try:
        for args, p in zip(commands, procs, strict=True):
            out, err = p.communicate(timeout=timeout_s)
            done.append(subprocess.CompletedProcess([*FEDCTL, *args], p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done

TASK_TEMPLATE = """\
name: {name}
model:
  architecture: {architecture}
  arguments: {arguments}
rounds: {rounds}
clients_per_round: {clients_per_round}
min_reports: {min_reports}
over_selection: {over_selection}
round_deadline_s: {round_deadline_s}
selection_window_s: {selection_window_s}
local: {{epochs: 2, batch_size: 16, optimizer: sgd, learning_rate: 0.1}}
server: {{kind: fedavg, learning_rate: 1.0}}
evaluation: {{fraction: 0.5, server_data: "digits:split=test"}}
{extra}"""


def write_task(path: Path, **overrides: object) -> Path:
    values: dict[str, object] = dict(
        name="it", architecture="logistic_regression",
        arguments="{input_dim: 64, num_classes: 10}", rounds=2, clients_per_round=4,
        min_reports=3, over_selection=1.0, round_deadline_s=60, selection_window_s=1.0,
        extra="",
    )
    values.update(overrides)
    path.write_text(TASK_TEMPLATE.format(**values))
    return path


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1 now (for commands that take
    one port and use the next ones too: ``fedctl cluster up``)."""
    import random
    import socket

    for _ in range(50):
        first = random.randrange(20000, 60000)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free consecutive ports")
