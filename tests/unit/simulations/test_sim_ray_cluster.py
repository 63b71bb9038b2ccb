"""--ray HOST:PORT: a simulation spread over a Ray cluster of two nodes (two `ray start`
processes on this machine, one CPU each) trains on both nodes and gives the in-process model,
with the population held (load: all) and generated round by round (load: per_round)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'ray==2.*')")

pytestmark = pytest.mark.slow  # starts two Ray nodes (~30 s on the loaded 2-core machine)

#: Seconds the two nodes may take to start (measured: 19 s + 12 s at load 3-4 on 2 cores).
START_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], deadline: float) -> None:
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise AssertionError(f"ray start exited with {process.returncode}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"ray start did not report {text!r} in time:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def two_node_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """The head's address and the environment a driver needs. Each node is a `ray start
    --block` in its own session, killed (its whole process group) in teardown, whatever
    happened; token authentication with a token of this test's own."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"the ray command is not installed beside {sys.executable}")
    # Short: Ray's socket paths live under it (AF_UNIX paths are limited to 107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0")
    common = ["--num-cpus=1", "--object-store-memory=78643200", "--disable-usage-stats",
              "--block"]
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> None:
        log = temp / f"{name}.log"
        with log.open("wb") as out:
            nodes.append(subprocess.Popen([str(ray_cli), "start", *args, *common], env=env,
                                          stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        _wait_for(log, "Ray runtime started", nodes[-1], time.monotonic() + START_TIMEOUT_S)

    try:
        began = time.monotonic()
        # Ports Ray would otherwise take at fixed defaults (the client server's 10001, the
        # dashboard agent's 52365), which another Ray on this machine may hold.
        start("head", ["--head", f"--port={port}", f"--temp-dir={temp}",
                       "--include-dashboard=false", f"--ray-client-server-port={_free_port()}",
                       f"--dashboard-agent-listen-port={_free_port()}"])
        start("second", [f"--address={address}",
                         f"--dashboard-agent-listen-port={_free_port()}"])
        print(f"two Ray nodes started in {time.monotonic() - began:.1f} s")
        yield address, env
    finally:
        for node in nodes:
            # SIGTERM would drain for 30 s; these nodes hold nothing worth draining.
            try:
                os.killpg(node.pid, signal.SIGKILL)  # the node's session: raylet, GCS...
            except ProcessLookupError:
                pass
            node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_on_two_ray_nodes_trains_on_both_and_matches_the_in_process_one(
        two_node_cluster: tuple[str, dict[str, str]]) -> None:
    address, env = two_node_cluster
    # The driver runs in its own process: Ray reads the authentication settings once per
    # process, and this one's must stay as they were for the other tests.
    driver = Path(__file__).with_name("ray_cluster_driver.py")
    done = subprocess.run([sys.executable, str(driver), address], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["load"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(runs) == {"all", "per_round"}
    for run in runs.values():
        jobs = run["jobs_by_node"]
        assert len(jobs) == 2, run  # the two actors run on the two nodes
        assert all(count > 0 for count in jobs.values()), run  # and both trained
        assert sum(jobs.values()) == 2 * 5, run  # every job of the 2 rounds of 5 devices
        assert run["max_abs_diff"] <= 1e-6, run  # the in-process model
