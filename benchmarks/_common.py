"""Shared pieces of the benchmarks: a coordinator subprocess (plaintext or TLS, device
authentication on or off, with an admin token of its own) and a bare gRPC server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordinator.security.service import write_secret_file
from core.security.bearer import new_secret
from core.tls import ClientTls, load_client_tls, write_local_ca
from fedctl.admin import AdminClient

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

#: A benchmark sends every device's calls from one address (127.0.0.1), which the
#: coordinator's flood limits are made to stop: check-ins per address (1000/s) and per device
#: (5/s), enrollments per address (20/s) and concurrent transfers per address (64). Lifted
#: (:class:`CoordinatorSubprocess`'s ``lift_limits``), they never refuse a benchmark's call,
#: though an authenticating coordinator still checks them on every call.
LIFTED_LIMITS = ("--rate-limit", "device-checkin=1000000/1000000",
                 "--rate-limit", "peer-checkin=1000000/1000000",
                 "--rate-limit", "peer-enroll=1000000/1000000",
                 "--max-streams-per-peer", "100000")
LIFTED_LIMITS_NOTE = ("every device on one address: rate limits device-checkin, peer-checkin "
                      "and peer-enroll raised to 1e6/s burst 1e6, max-streams-per-peer 100000")


class CoordinatorSubprocess:
    """A ``fedctl coordinator serve`` of its own, in a temporary directory.

    ``tls=True``: it serves TLS with a fresh local CA (`fedctl certs init`'s code);
    :attr:`client_tls` is then what clients need to reach it. ``device_auth=False`` serves
    with ``--no-device-auth`` (check-ins taken at their word: the pre-security baseline).
    ``lift_limits``: see :data:`LIFTED_LIMITS`. Admin calls need :attr:`admin_token`
    (:meth:`admin` presents it); agents started with :attr:`agent_env` present it too and keep
    their device keys in the temporary directory."""

    def __init__(self, *, tls: bool = False, device_auth: bool = True,
                 lift_limits: bool = True) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="fedcoord-bench-")
        self.dir = Path(self.tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.client_tls: ClientTls | None = None
        self.admin_token = new_secret("fct").secret
        write_secret_file(self.dir / "admin.token", self.admin_token)
        self._args = ["--admin-token-file", str(self.dir / "admin.token")]
        if tls:
            files = write_local_ca(self.dir / "tls")
            self.client_tls = load_client_tls(files.ca_cert)
            self._args += ["--tls", str(self.dir / "tls")]
        if not device_auth:
            self._args.append("--no-device-auth")
        if lift_limits:
            self._args += LIFTED_LIMITS

    def _launcher(self) -> list[str]:
        """What runs ``fedctl`` here; the arguments from ``coordinator serve`` on follow."""
        return [sys.executable, "-m", "fedctl"]

    def __enter__(self) -> CoordinatorSubprocess:
        port_file = self.dir / "port"
        self.proc = subprocess.Popen(
            [*self._launcher(), "coordinator", "serve",
             "--db", f"sqlite:///{self.dir}/bench.db", "--store", str(self.dir / "store"),
             "--port", "0", "--port-file", str(port_file), *self._args],
            stdout=open(self.dir / "coordinator.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=ENV, cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.dir / "coordinator.log").read_text())
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin(self) -> AdminClient:
        return AdminClient(self.target, tls=self.client_tls, token=self.admin_token)

    @property
    def agent_env(self) -> dict[str, str]:
        """The environment for `fedctl` commands against this coordinator: its admin token,
        and a device key directory of its own."""
        return dict(ENV, FEDCOORD_TOKEN=self.admin_token,
                    FEDCOORD_AGENT_STATE=str(self.dir / "agents"))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()


BARE_SERVER = r'''
import asyncio, sys
import grpc

async def main() -> None:
    async def unary(request: bytes, context) -> bytes:
        return request
    async def upload(request_iterator, context) -> bytes:
        n = 0
        async for chunk in request_iterator:
            n += len(chunk)
        return n.to_bytes(8, "little")
    async def download(request: bytes, context):
        total = int.from_bytes(request[:8], "little"); chunk = int.from_bytes(request[8:16], "little")
        block = bytes(chunk)
        sent = 0
        while sent < total:
            n = min(chunk, total - sent)
            yield block[:n]
            sent += n
    ident = lambda b: b
    handler = grpc.method_handlers_generic_handler("bare.Bare", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, ident, ident),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, ident, ident),
        "Download": grpc.unary_stream_rpc_method_handler(download, ident, ident),
    })
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 2 << 20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
'''


class BareServer:
    """A grpc.aio server with no logic: the transport floor."""

    def __enter__(self) -> BareServer:
        self.proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER], stdout=subprocess.PIPE,
                                     env=ENV)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used so far; 0 where it is
    gone: a process's own cost, whatever else shares the machine's cores."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # utime and stime: fields 14 and 15 of proc(5), 12 and 13 after the ")".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_load() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: beside every figure a benchmark prints."""
    return [round(x, 2) for x in os.getloadavg()]
