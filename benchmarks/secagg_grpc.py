"""One round of 100 devices over real gRPC, with agent processes: secure aggregation against
plaintext uploads, same coordinator, same agents, same ~112k-parameter MLP (64-1500-10).

Agents train one epoch on tiny digits shards (about 18 examples each), so the round is
dominated by the protocol and the transport; the reported figure is the committed round's
``round_seconds`` (from round start to commit, so it includes the 0.5 s selection window and
the local epoch) for round 2 and later (round 1 includes the agents' start-up), and its
difference to the plaintext round.

``--flower`` then runs the same pair in Flower 1.42's deployment engine at the same n and d
(:mod:`benchmarks.flower_secagg_deployment`: SuperLink and one SuperNode process per device on
localhost, fixed updates, no training) with Flower's share count and threshold set to ours
(num_shares = k + 1 holders, reconstruction_threshold = t), so both sides run over a real
transport between processes. For one process per device on our side too, pass
``--processes`` equal to ``--devices``.

    python benchmarks/secagg_grpc.py [--devices 100] [--processes 4] [--rounds 3] [--flower]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import LIFTED_LIMITS_NOTE, ROOT, CoordinatorSubprocess  # noqa: E402
from core.taskspec import parse_task_yaml  # noqa: E402

TASK = """\
name: {name}
model: {{architecture: mlp, arguments: {{input_dim: 64, hidden: [1500], num_classes: 10}}}}
rounds: {rounds}
clients_per_round: {devices}
min_reports: {min_reports}
over_selection: 1.0
round_deadline_s: 120
selection_window_s: 0.5
local: {{epochs: 1, batch_size: 32, optimizer: sgd, learning_rate: 0.05}}
{extra}"""

NEIGHBOURS, THRESHOLD = 10, 0.6
SECURE = (f"secure_aggregation: {{protocol: secagg+, neighbours: {NEIGHBOURS}, "
          f"threshold: {THRESHOLD}, dropout: 0.001, corrupt_fraction: 0.0, clip: 1.0, "
          "phase_timeout_s: 30}\n")
D = 97_510 + 15_010  # parameters of the 64-1500-10 MLP


def run(coord: CoordinatorSubprocess, name: str, devices: int, processes: int, rounds: int,
        extra: str, *, measure_cpu: bool = False) -> tuple[list[float], float]:
    """Per-round ``round_seconds`` of a task, and with ``measure_cpu`` the coordinator's CPU
    seconds per round (user + system) from the first commit to the last, i.e. without the
    task's one-time start-up (model creation, first imports and caches). The agents enroll
    their keys and sign their check-ins (open enrollment, the coordinator's default)."""
    import psutil

    assert coord.proc is not None, "start the coordinator first"
    proc = psutil.Process(coord.proc.pid) if measure_cpu else None
    target = coord.target
    first_commit_cpu: float | None = None
    spec = parse_task_yaml(TASK.format(name=name, devices=devices, rounds=rounds,
                                       min_reports=devices, extra=extra))
    with coord.admin() as admin:
        task_id = admin.create_task(spec).task_id
    per = devices // processes
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "fedctl", "agent", "run", "--coordinator", target,
             "--device-id", f"{name}-p{i}-", "--devices", str(per), "--task", task_id,
             "--data", f"digits:shard={i * per}/{devices},dirichlet=0.5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=coord.agent_env, cwd=ROOT)
        for i in range(processes)
    ]
    try:
        with coord.admin() as admin:
            deadline = time.monotonic() + 900
            while (task := admin.get_task(task_id)).state == "running":
                assert time.monotonic() < deadline, "task did not finish"
                if proc is not None and first_commit_cpu is None and task.rounds_committed >= 1:
                    first_commit_cpu = sum(proc.cpu_times()[:2])
                time.sleep(0.05)
            rounds_seen = admin.list_rounds(task_id)
    finally:
        for a in agents:
            a.wait(timeout=60)
    cpu = float("nan")
    if proc is not None and first_commit_cpu is not None:
        cpu = (sum(proc.cpu_times()[:2]) - first_commit_cpu) / (rounds - 1)
    committed = [r for r in rounds_seen if r.state == "committed"]
    assert len(committed) == rounds, [(r.state, r.failure_reason) for r in rounds_seen]
    return [float(r.metrics["round_seconds"]) for r in committed], cpu


def grpc_round_pair(n: int = 100, processes: int = 4, rounds: int = 3, seed: int = 0
                    ) -> list[dict[str, object]]:
    with CoordinatorSubprocess() as coord:
        plain, _ = run(coord, "plain", n, processes, rounds, "")
        secure, _ = run(coord, "secure", n, processes, rounds, SECURE)
    steady_plain = sum(plain[1:]) / len(plain[1:])
    steady_secure = sum(secure[1:]) / len(secure[1:])
    k = min(NEIGHBOURS, n - 1)
    return [{
        "benchmark": "secagg_grpc", "engine": "fedcoord", "n": n, "d": D,
        "transport": "gRPC: coordinator and agent processes on 127.0.0.1",
        "agent_processes": processes, "neighbours": k,
        "device_auth": "agents enroll Ed25519 keys and sign every check-in",
        "limits": LIFTED_LIMITS_NOTE,
        "threshold": max(2, math.ceil(THRESHOLD * (k + 1) - 1e-9)),
        "plaintext_round_s": round(steady_plain, 3), "secure_round_s": round(steady_secure, 3),
        "secure_over_plaintext": round(steady_secure / steady_plain, 2),
        "plaintext_rounds_s": [round(x, 3) for x in plain],
        "secure_rounds_s": [round(x, 3) for x in secure],
    }]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flower", action="store_true",
                    help="then the same pair in Flower's deployment engine")
    ap.add_argument("--flower-timeout", type=float, default=900.0)
    args = ap.parse_args()
    for row in grpc_round_pair(args.devices, args.processes, args.rounds):
        print(json.dumps(row), flush=True)
    if args.flower:
        from benchmarks.flower_secagg_deployment import run_deployment

        ours = row
        for secure in (True, False):
            flower = run_deployment(args.devices, D, secure=secure, rounds=args.rounds,
                                    num_shares=int(ours["neighbours"]) + 1,
                                    threshold=int(ours["threshold"]),
                                    timeout_s=args.flower_timeout)
            print(json.dumps(flower), flush=True)


if __name__ == "__main__":
    main()
