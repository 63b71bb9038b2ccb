"""Flower 1.42 SecAgg+ round cost, for side-by-side comparison with fedcoord's own SecAgg.

What is measured
----------------
One Flower simulation (``flwr.simulation.run_simulation``, Ray backend, in a child process)
per setting, with ``n`` virtual SuperNodes. Every ClientApp answers a train message with a
fixed pseudo-random float32 update of ``d`` parameters (seeded by its partition id) and
``num_examples=1``; there is no local training, so only the protocol and the simulation
transport are timed.

* ``secure=True``: ServerApp runs ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``
  with a legacy ``FedAvg`` strategy; ClientApp has ``mods=[drop_mod, secaggplus_mod]``.
  A round is the four SecAgg+ stages (setup, share keys, collect masked vectors, unmask)
  plus unmasking, dequantisation and ``FedAvg.aggregate_fit`` on the server.
* ``secure=False``: the same apps with Flower's plain default fit workflow (one train
  message per client, FedAvg over the float32 updates) and ``mods=[drop_mod]``.

The fit workflow is wrapped by a timer: ``round_walls_s`` lists the wall time of each fit
round and ``round_wall_s`` is their mean over rounds 2..R. Round 1 is a warm-up: the
ServerApp thread starts it as soon as the nodes are registered, while Ray is still starting
and building its actor pool, so it absorbs the simulation start-up. ``startup_s`` is the
time from the ``run_simulation`` call to round 1, plus how much longer round 1's first
message exchange took than the same exchange when warm. ``stage_s`` gives the mean wall
time of each SecAgg+ stage (setup, share_keys, collect_masked_vectors, unmask) over the
timed rounds, or of the single 'fit' exchange in plaintext mode.
Note that the in-memory simulation transport polls: the server pulls replies every 0.1 s and
the engine pushes queued messages every 0.1 s, so each message exchange (4 per SecAgg+
round, 1 per plaintext round) costs about 0.1-0.2 s even with no work.
Evaluation is switched off (``fraction_evaluate=0``, no ``evaluate_fn``). After each round
the aggregate is checked against the mean of the surviving clients' updates
(``max_abs_err``); a setting is ``ok`` only if every round finished, SecAgg+ did not halt
and the aggregate matched. Ray gets every core and each client one CPU, so there is one
ClientApp actor per core; the ServerApp runs in a thread of the same child process.
SecAggPlusWorkflow runs with Flower's defaults except ``max_weight=1`` (every client
reports ``num_examples=1``) and ``timeout=None``; its neighbour ring is shuffled with
``random.seed(seed)`` so a setting is repeatable.

How dropouts are emulated
-------------------------
``round(dropout * n)`` partition ids, drawn with ``random.Random(seed)``, drop out in every
round. ``drop_mod`` sits before ``secaggplus_mod`` and raises for those clients when the
message is the SecAgg+ 'collect masked vectors' stage, i.e. after they have sent their
public keys and encrypted key shares but before they upload a masked vector: the worst
point for the server, which must rebuild their secret keys from the neighbours' shares in
'unmask' and strip their pairwise masks. In plaintext mode the same clients raise on the
train message. The simulation engine turns the exception into an error reply, which Flower
counts as a failure and removes the node from the active set, so this is a dropout that is
detected at once (as a closed connection would be). A silent hang cannot be emulated in
the simulation engine: a hanging ClientApp holds one of the few Ray actors forever and
starves the other clients, and the server would only measure ``timeout``.

Run ``python benchmarks/flower_secagg.py --help``; one JSON line per setting on stdout.
Needs ``flwr[simulation]==1.42.*`` (Ray) in the environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}
RAY_OBJECT_STORE_BYTES = 2 * 1024**3
MAX_ABS_ERR = 1e-3  # SecAgg+ quantises to 2**22 levels over [-8, 8]: ~4e-6 per client
DEFAULT_TIMEOUT_S = 900.0
# 10% of the sampled clients as neighbours (11 of 100), half of them to reconstruct: with
# 10% dropout no neighbourhood loses half its members. Flower's example uses 3 and 2,
# which halts at 10% dropout as soon as two dropped clients are ring neighbours.
DEFAULT_NUM_SHARES = 0.1
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Setting:
    """One benchmark point; serialised to JSON for the child process."""

    n: int
    d: int
    secure: bool
    num_shares: int | float
    threshold: int | float
    dropout: float
    rounds: int = 2
    seed: int = 0


@dataclass
class RoundLog:
    """What the timed fit workflow records in the child (ServerApp thread)."""

    t_sim_start: float = 0.0
    starts: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)  # SecAgg+ only


# ----------------------------------------------------------------------------- workload


def dropped_partitions(n: int, dropout: float, seed: int) -> frozenset[int]:
    """Partition ids of the clients that drop out (the same ones in every round)."""
    return frozenset(random.Random(seed).sample(range(n), round(dropout * n)))


def client_update(partition_id: int, d: int, seed: int) -> np.ndarray:
    """The fixed float32 update that client ``partition_id`` sends, values in [-1, 1)."""
    rng = np.random.default_rng([seed, partition_id])
    return rng.uniform(-1.0, 1.0, d).astype(np.float32)


def expected_mean(s: Setting) -> np.ndarray:
    """Mean of the surviving clients' updates: what every round must aggregate to."""
    dropped = dropped_partitions(s.n, s.dropout, s.seed)
    total = np.zeros(s.d, dtype=np.float64)
    for pid in range(s.n):
        if pid not in dropped:
            total += client_update(pid, s.d, s.seed)
    return total / (s.n - len(dropped))


# ----------------------------------------------------------------------------- child side


def _make_client_app(s: Setting) -> ClientApp:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    dropped = dropped_partitions(s.n, s.dropout, s.seed)
    cache: dict[int, np.ndarray] = {}

    class FixedUpdateClient(NumPyClient):
        def __init__(self, partition_id: int) -> None:
            self.partition_id = partition_id

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            if self.partition_id not in cache:  # cached per Ray actor: not timed work
                cache[self.partition_id] = client_update(self.partition_id, s.d, s.seed)
            return [cache[self.partition_id]], 1, {}

    def client_fn(context: Context) -> Any:
        return FixedUpdateClient(int(context.node_config["partition-id"])).to_client()

    drop_mod = _make_drop_mod(dropped, s.secure)
    mods = [drop_mod, secaggplus_mod] if s.secure else [drop_mod]
    return ClientApp(client_fn=client_fn, mods=mods)


def _make_drop_mod(
    dropped: frozenset[int], secure: bool
) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    from flwr.app.message_type import MessageType
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    def at_drop_point(msg: Message) -> bool:
        if msg.metadata.message_type != MessageType.TRAIN:
            return False
        if not secure:
            return True
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        return configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS

    def drop_mod(
        msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        pid = int(ctxt.node_config["partition-id"])
        if pid in dropped and at_drop_point(msg):
            raise ConnectionError(f"emulated dropout of partition {pid}")
        return call_next(msg, ctxt)

    return drop_mod


def _timed_fit_workflow(
    inner: Callable[[Grid, Context], None], s: Setting, log: RoundLog
) -> Callable[[Grid, Context], None]:
    """Wrap a fit workflow: time it, then check the aggregate (outside the timing)."""
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    want: list[np.ndarray] = []

    def workflow(grid: Grid, context: Context) -> None:
        t0 = time.perf_counter()
        log.starts.append(t0)
        log.stages.append({})
        inner(grid, context)
        log.walls.append(time.perf_counter() - t0)
        if not log.stages[-1]:
            log.stages[-1]["fit"] = log.walls[-1]  # plaintext: one message exchange
        if not want:
            want.append(expected_mean(s))
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        got = parameters_to_ndarrays(arrayrecord_to_parameters(record, keep_input=True))
        ok_shape = len(got) == 1 and got[0].shape == (s.d,)
        log.errors.append(float(np.max(np.abs(got[0] - want[0]))) if ok_shape else float("inf"))

    return workflow


SECAGG_STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")


def _stage_timed_secaggplus(s: Setting, log: RoundLog) -> Callable[[Grid, Context], None]:
    """A SecAggPlusWorkflow whose four stage methods record their wall time."""
    from flwr.server.workflow import SecAggPlusWorkflow

    # max_weight=1 matches num_examples=1, so quantisation keeps full precision.
    wf = SecAggPlusWorkflow(s.num_shares, s.threshold, max_weight=1.0)
    for name in SECAGG_STAGES:
        setattr(wf, name, _timed_stage(getattr(wf, name), name.removesuffix("_stage"), log))
    return wf


def _timed_stage(fn: Callable[..., bool], name: str, log: RoundLog) -> Callable[..., bool]:
    def stage(*args: Any) -> bool:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            log.stages[-1][name] = time.perf_counter() - t0

    return stage


def _make_server_app(s: Setting, log: RoundLog) -> ServerApp:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(s.seed)  # SecAggPlusWorkflow shuffles the neighbour ring with `random`
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=s.n,
            min_available_clients=s.n,
            initial_parameters=ndarrays_to_parameters([np.zeros(s.d, dtype=np.float32)]),
        )
        legacy = LegacyContext(context, ServerConfig(num_rounds=s.rounds), strategy)
        inner = _stage_timed_secaggplus(s, log) if s.secure else default_fit_workflow
        DefaultWorkflow(fit_workflow=_timed_fit_workflow(inner, s, log))(grid, legacy)

    return app


def simulate(s: Setting) -> dict[str, Any]:
    """Run one Flower simulation in this process and return its timings."""
    from flwr.simulation import run_simulation

    log = RoundLog()
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "object_store_memory": RAY_OBJECT_STORE_BYTES},
    }
    log.t_sim_start = time.perf_counter()
    run_simulation(
        server_app=_make_server_app(s, log),
        client_app=_make_client_app(s),
        num_supernodes=s.n,
        backend_config=backend_config,
    )
    return {
        "until_round1_s": log.starts[0] - log.t_sim_start if log.starts else None,
        "round_walls_s": log.walls,
        "stages": log.stages,
        "max_abs_err": max(log.errors) if log.errors else None,
        "rounds_done": len(log.walls),
    }


def _child_main(setting_json: str, out_path: str) -> int:
    result = simulate(Setting(**json.loads(setting_json)))
    Path(out_path).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- parent side


def _flwr_version() -> str | None:
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return None


def _run_child(s: Setting, timeout_s: float, workdir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Run ``simulate`` in a fresh process group; kill the whole group on timeout."""
    out_path, log_path = workdir / "result.json", workdir / "child.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(s)), str(out_path)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV}, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc)
    if rc is None:
        return None, f"timeout after {timeout_s:.0f}s; log tail: {_tail(log_path)}"
    if rc != 0 or not out_path.exists():
        return None, f"child exited {rc}; log tail: {_tail(log_path)}"
    return json.loads(out_path.read_text()), None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the child's process group (the child and the Ray processes it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(0.5)  # let Ray's helpers in the same group see the signal


def _tail(path: Path, chars: int = 1500) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_flower_round(
    n: int,
    d: int,
    *,
    secure: bool,
    num_shares: int | float,
    reconstruction_threshold: int | float,
    dropout: float,
    rounds: int = 2,
    seed: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Time Flower rounds for one setting in a subprocess with a hard timeout."""
    s = Setting(n, d, secure, num_shares, reconstruction_threshold, dropout, rounds, seed)
    row: dict[str, Any] = {
        "engine": "flower", "flwr_version": _flwr_version(), "n": n, "d": d,
        "secure": secure, "dropout": dropout, "num_shares": num_shares,
        "threshold": reconstruction_threshold, "rounds": rounds,
        "dropped": len(dropped_partitions(n, dropout, seed)),
        "round_wall_s": None, "round_walls_s": [], "startup_s": None, "stage_s": None,
        "max_abs_err": None, "ok": False, "error": None,
    }
    with tempfile.TemporaryDirectory(prefix="flower-secagg-") as tmp:
        res, err = _run_child(s, timeout_s, Path(tmp))
    if res is None:
        row["error"] = err
        return row
    walls: list[float] = res["round_walls_s"]
    timed = slice(1, None) if len(walls) > 1 else slice(None)
    stage_s = _stage_means(res["stages"][timed])
    row.update(
        round_walls_s=[round(w, 4) for w in walls], max_abs_err=res["max_abs_err"],
        round_wall_s=_mean(walls[timed]), stage_s=stage_s,
        startup_s=_startup(res, stage_s),
    )
    row["error"] = _check(res, rounds, secure)
    row["ok"] = row["error"] is None
    return row


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _stage_means(stages: list[dict[str, float]]) -> dict[str, float | None] | None:
    if not stages or not stages[0]:
        return None
    return {k: _mean([st[k] for st in stages if k in st]) for k in stages[0]}


def _startup(res: dict[str, Any], stage_s: dict[str, float | None] | None) -> float | None:
    """Time to round 1 plus the extra time of round 1's first exchange over a warm one.

    The first exchange (SecAgg+ 'setup', or the single plaintext fit exchange) is where
    the clients first run, so it waits for Ray and the actor pool; the later stages of
    round 1 run warm. Comparing only that exchange keeps round-to-round noise out.
    """
    stages: list[dict[str, float]] = res["stages"]
    until_round1: float | None = res["until_round1_s"]
    if until_round1 is None or not stages or not stages[0] or not stage_s:
        return None
    first = next(iter(stages[0]))
    return until_round1 + stages[0][first] - (stage_s.get(first) or 0.0)


def _check(res: dict[str, Any], rounds: int, secure: bool) -> str | None:
    if res["rounds_done"] != rounds:
        return f"{res['rounds_done']} of {rounds} rounds ran"
    for i, stages in enumerate(res["stages"], start=1):
        if secure and "unmask" not in stages:
            return (f"SecAgg+ halted in round {i} after stage {list(stages)[-1]!r} "
                    "(too few active neighbours for the reconstruction threshold)")
    if res["max_abs_err"] is None or res["max_abs_err"] > MAX_ABS_ERR:
        return f"aggregate off by {res['max_abs_err']} (SecAgg+ halted or wrong result)"
    return None


# ----------------------------------------------------------------------------- CLI


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def _share(text: str) -> int | float:
    """Flower's convention: an int is a count, a float a proportion."""
    return float(text) if "." in text else int(text)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=_ints, default=[10, 50, 100, 200], help="comma list")
    p.add_argument("--d", type=_ints, default=[10_000, 100_000, 1_000_000], help="comma list")
    p.add_argument("--dropout", type=_floats, default=[0.0, 0.1], help="comma list")
    p.add_argument("--mode", choices=["both", "secure", "plain"], default="both")
    p.add_argument("--num-shares", type=_share, default=DEFAULT_NUM_SHARES,
                   help="SecAggPlusWorkflow num_shares (int count or float fraction of n)")
    p.add_argument("--threshold", type=_share, default=DEFAULT_THRESHOLD,
                   help="reconstruction_threshold (int count or float fraction of num_shares)")
    p.add_argument("--rounds", type=int, default=2, help="round 1 is the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="hard limit in seconds for each setting's simulation")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child_main(argv[1], argv[2])
    args = _parse(argv)
    modes = {"both": [True, False], "secure": [True], "plain": [False]}[args.mode]
    for n in args.n:
        for d in args.d:
            for dropout in args.dropout:
                for secure in modes:
                    row = run_flower_round(
                        n, d, secure=secure, num_shares=args.num_shares,
                        reconstruction_threshold=args.threshold, dropout=dropout,
                        rounds=args.rounds, seed=args.seed, timeout_s=args.timeout,
                    )
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
