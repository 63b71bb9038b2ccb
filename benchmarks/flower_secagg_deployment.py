"""Flower 1.42's SecAgg+ over a real transport: its deployment engine on localhost, for
comparison with ``benchmarks/secagg_grpc.py`` (our coordinator and agent processes over gRPC).

What runs
---------
One SuperLink (``flower-superlink --insecure``, its state in a SQLite file in the temporary
directory, as our coordinator's; in flwr 1.42 its Fleet, Control and Runtime APIs are HTTP on
one local port) and ``n`` SuperNodes (``flower-supernode
--insecure``), each a process of its own with ``partition-id`` in its node config, all on
127.0.0.1. A Flower App written to a temporary directory is submitted with ``flwr run``
(``FLWR_HOME`` is a temporary directory too, so the user's Flower config is untouched). Flower
runs the ServerApp and each ClientApp in processes of their own (its default ``subprocess``
isolation). Nothing is fetched from the network: the app has no dependencies.

* ClientApp: answers a train message with a fixed pseudo-random float32 update of ``d``
  values (seeded by its partition id) and ``num_examples=1``; no local training. With
  ``secure`` it has ``mods=[secaggplus_mod]``.
* ServerApp: waits until the ``n`` nodes are registered, then runs ``DefaultWorkflow`` with
  ``SecAggPlusWorkflow(num_shares, reconstruction_threshold, max_weight=1)`` (secure) or
  Flower's plain fit workflow, a legacy ``FedAvg`` over all ``n`` nodes, no evaluation. Each
  fit round is timed inside the ServerApp and checked against the mean of the updates.

No dropouts (a SuperNode that dies is detected by heartbeat timeouts, which would time those,
not the protocol). Round 1 is reported apart: it includes each node's first fetch and
install of the app.

    python benchmarks/flower_secagg_deployment.py [--n 10] [--d 112520] [--rounds 3]
        [--mode both|secure|plain] [--num-shares 0.1|N] [--threshold 0.5|N] [--timeout 900]

One JSON line per mode. Needs the ``benchmark`` extra (flwr 1.42) in the running environment;
its ``flower-superlink``, ``flower-supernode`` and ``flwr`` scripts are taken from the
directory of ``sys.executable``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0"}

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "secaggbench"
version = "1.0.0"
description = "fedcoord benchmark: Flower SecAgg+ round cost"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedcoord"

[tool.flwr.app.components]
serverapp = "secaggbench.server:app"
clientapp = "secaggbench.client:app"

[tool.flwr.app.config]
n = 10
d = 1000
secure = 1
rounds = 3
num-shares = 0.1
threshold = 0.5
out = ""
"""

CLIENT = '''\
import numpy as np
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp


def update(partition_id, d):
    return np.random.default_rng([0, partition_id]).uniform(-1.0, 1.0, d).astype(np.float32)


class FixedUpdateClient(NumPyClient):
    def __init__(self, partition_id, d):
        self.partition_id, self.d = partition_id, d

    def fit(self, parameters, config):
        return [update(self.partition_id, self.d)], 1, {}


def client_fn(context):
    return FixedUpdateClient(int(context.node_config["partition-id"]),
                             int(context.run_config["d"])).to_client()


secure_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
plain_app = ClientApp(client_fn=client_fn)
'''

SERVER = '''\
import json
import random
import time

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import ServerApp

from secaggbench.client import update

app = ServerApp()


def share(value):
    return float(value) if "." in str(value) else int(value)


@app.main()
def main(grid, context):
    cfg = context.run_config
    n, d, secure = int(cfg["n"]), int(cfg["d"]), bool(int(cfg["secure"]))
    random.seed(0)  # SecAggPlusWorkflow shuffles the neighbour ring with `random`
    t_wait = time.perf_counter()
    while len(list(grid.get_node_ids())) < n:
        time.sleep(0.1)
    registered_s = time.perf_counter() - t_wait
    want = np.mean([update(i, d).astype(np.float64) for i in range(n)], axis=0)
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                      min_available_clients=n,
                      initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32)]))
    legacy = LegacyContext(context, ServerConfig(num_rounds=int(cfg["rounds"])), strategy)
    inner = (SecAggPlusWorkflow(share(cfg["num-shares"]), share(cfg["threshold"]),
                                max_weight=1.0) if secure else default_fit_workflow)
    walls, errors = [], []

    def timed(grid, ctx):
        t0 = time.perf_counter()
        inner(grid, ctx)
        walls.append(time.perf_counter() - t0)
        got = parameters_to_ndarrays(arrayrecord_to_parameters(
            ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True))
        errors.append(float(np.max(np.abs(got[0] - want))))

    DefaultWorkflow(fit_workflow=timed)(grid, legacy)
    with open(cfg["out"], "w") as f:
        json.dump({"round_walls_s": walls, "max_abs_err": max(errors),
                   "registered_s": registered_s}, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_app(root: Path, secure: bool) -> Path:
    app = root / "app"
    (app / "secaggbench").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT.replace(
        'clientapp = "secaggbench.client:app"',
        f'clientapp = "secaggbench.client:{"secure" if secure else "plain"}_app"'))
    (app / "secaggbench" / "__init__.py").write_text("")
    (app / "secaggbench" / "client.py").write_text(CLIENT)
    (app / "secaggbench" / "server.py").write_text(SERVER)
    return app


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started processes, each in its own session; their whole groups end on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + 10
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
            if all(p.poll() is not None for p in procs):
                break


def run_deployment(n: int, d: int, *, secure: bool, rounds: int, num_shares: int | float,
                   threshold: int | float, timeout_s: float) -> dict[str, Any]:
    """One ``flwr run`` on a fresh SuperLink and ``n`` SuperNodes; its round timings."""
    row: dict[str, Any] = {"benchmark": "secagg_transport", "engine": "flower",
                           "deployment": "SuperLink + SuperNodes as processes on 127.0.0.1",
                           "n": n, "d": d, "secure": secure, "dropout": 0.0,
                           "num_shares": num_shares, "threshold": threshold, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="flower-deploy-") as tmp, _processes() as procs:
        root = Path(tmp)
        home = root / "flwr-home"
        home.mkdir()
        link_port = _free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
        env = {**os.environ, **ENV, "FLWR_HOME": str(home),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        logs = root / "logs"
        logs.mkdir()

        def start(name: str, cmd: list[str]) -> None:
            log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(cmd, env=env, cwd=root, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))

        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--port",
                            str(link_port), "--database", str(root / "superlink.db")])
        for i in range(n):
            start(f"supernode-{i}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink",
                f"127.0.0.1:{link_port}", "--port", str(_free_port()),
                "--node-config", f"partition-id={i} num-partitions={n}"])
        out = root / "result.json"
        app = _write_app(root, secure)
        config = (f"n={n} d={d} secure={int(secure)} rounds={rounds} "
                  f"num-shares={num_shares} threshold={threshold} out='{out}'")
        deadline = time.monotonic() + timeout_s
        submitted = None
        while submitted is None and time.monotonic() < deadline:
            done = subprocess.run([str(BIN / "flwr"), "run", str(app), "local",
                                   "--run-config", config], env=env, capture_output=True)
            if done.returncode == 0:
                submitted = time.perf_counter()
            else:
                time.sleep(1.0)  # the SuperLink is still starting
        while submitted is not None and not out.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not out.exists():
            tail = (logs / "superlink.log").read_text(errors="replace")[-1500:]
            return {**row, "ok": False,
                    "error": f"no result within {timeout_s:.0f}s; SuperLink log: {tail}"}
        time.sleep(0.2)  # the ServerApp writes the file in one call; let it close it
        result = json.loads(out.read_text())
    walls: list[float] = result["round_walls_s"]
    steady = walls[1:] or walls
    ok = len(walls) == rounds and result["max_abs_err"] < 1e-3
    return {**row, "round_s": round(sum(steady) / len(steady), 3),
            "round_walls_s": [round(w, 3) for w in walls],
            "max_abs_err": result["max_abs_err"], "ok": ok,
            "error": None if ok else "rounds missing or aggregate wrong"}


def _share(text: str) -> int | float:
    """Flower's convention: an int is a count, a float a proportion."""
    return float(text) if "." in text else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--d", type=int, default=112_520, help="secagg_grpc.py's model size")
    ap.add_argument("--rounds", type=int, default=3, help="round 1 is reported apart")
    ap.add_argument("--mode", choices=["both", "secure", "plain"], default="both")
    ap.add_argument("--num-shares", type=_share, default=0.1)
    ap.add_argument("--threshold", type=_share, default=0.5)
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    modes = {"both": [True, False], "secure": [True], "plain": [False]}[args.mode]
    for secure in modes:
        print(json.dumps(run_deployment(args.n, args.d, secure=secure, rounds=args.rounds,
                                        num_shares=args.num_shares, threshold=args.threshold,
                                        timeout_s=args.timeout)), flush=True)


if __name__ == "__main__":
    main()
