"""Large simulated populations through ``fedctl simulate``: each run is a fresh ``fedctl
simulate TASK --json`` process on a copy of ``simulations/examples/synthetic_100k.yaml``
(Synthetic(1,1), logistic regression, heterogeneous devices) with ``--devices``,
``--per-round`` (clients_per_round; min_reports 60% of it), ``--rounds`` and
``simulation.population.load`` set; prints one JSON line per run: population, devices per
round, rounds, seconds per round (from the run's metrics.jsonl; median and each), set-up
seconds (process start to the first round: imports, the population, the evaluation
sample), the process's peak RSS (``wait4``'s ``ru_maxrss``), the final accuracy, the
1-minute load average before and after, and ``--note``.

``--stages`` runs the simulation in this process instead (``load: per_round`` only) and
adds, per round, the seconds spent generating the admitted devices' data (the rest is
selection, packing, training, aggregation and evaluation).

``--load all,per_round`` alternates the two loadings (``--repeat`` passes, the order reversed
every other pass), so a before/after comparison shares the machine's load:

    python benchmarks/sim_population.py --devices 100000 --per-round 1000 --rounds 3
    python benchmarks/sim_population.py --devices 10000 --per-round 1000 --rounds 3 \\
        --load all,per_round --repeat 2
    python benchmarks/sim_population.py --devices 100000 --per-round 1000 --rounds 3 --stages

Runs one simulation at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "simulations" / "examples" / "synthetic_100k.yaml"


def task_file(directory: Path, *, devices: int, per_round: int, load: str) -> Path:
    """The example with this run's population, cohort and loading."""
    task = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    task["clients_per_round"] = per_round
    task["min_reports"] = max(1, int(0.6 * per_round))
    task["simulation"]["population"].update(devices=devices, load=load)
    path = directory / f"task-{load}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return path


def run(*, devices: int, per_round: int, rounds: int, load: str, note: str) -> dict[str, Any]:
    fedctl = Path(sys.executable).with_name("fedctl")
    with tempfile.TemporaryDirectory(prefix="sim-population-") as tmp:
        directory = Path(tmp)
        task = task_file(directory, devices=devices, per_round=per_round, load=load)
        out = directory / "out"
        load_before = os.getloadavg()[0]
        began = time.perf_counter()
        process = subprocess.Popen(
            [str(fedctl), "simulate", str(task), "--rounds", str(rounds), "--json",
             "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert process.stdout is not None
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - began
        if process.returncode != 0:
            raise SystemExit(f"fedctl simulate exited with {process.returncode}")
        summary = json.loads(stdout.decode().strip().splitlines()[-1])
        ends = [json.loads(line)["wall_s"]
                for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round_s = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    return {
        "benchmark": "sim_population", "load": load, "population": devices,
        "per_round": per_round, "rounds": len(ends), "committed": summary["committed"],
        "s_per_round_median": round(statistics.median(per_round_s), 2),
        "s_per_round": [round(s, 2) for s in per_round_s],
        "setup_s": round(wall - ends[-1], 1), "wall_s": round(wall, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "final_accuracy": summary["final_accuracy"],
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(), "note": note,
    }


def stages(*, devices: int, per_round: int, rounds: int, note: str) -> dict[str, Any]:
    """One per_round simulation in this process, with each round's data-generation time."""
    sys.path.insert(0, str(ROOT))
    from simulations.config import load_simulation_file
    from simulations.engine import Simulation

    with tempfile.TemporaryDirectory(prefix="sim-population-") as tmp:
        task = task_file(Path(tmp), devices=devices, per_round=per_round, load="per_round")
        load_before = os.getloadavg()[0]
        began = time.perf_counter()
        sim = Simulation(load_simulation_file(task))
        setup = time.perf_counter() - began
    population = sim.population
    assert population is not None
    generate, wall, previous_wall, previous_generate = [], [], 0.0, population.generate_s
    for metrics in sim.rounds(rounds):
        wall.append(metrics.wall_s - previous_wall)
        generate.append(population.generate_s - previous_generate)
        previous_wall, previous_generate = metrics.wall_s, population.generate_s
    return {
        "benchmark": "sim_population_stages", "load": "per_round", "population": devices,
        "per_round": per_round, "rounds": len(wall),
        "s_per_round": [round(s, 2) for s in wall],
        "generate_s_per_round": [round(s, 2) for s in generate],
        "generate_share_median": round(statistics.median(
            g / w for g, w in zip(generate, wall, strict=True)), 3),
        "setup_s": round(setup, 1),
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(), "note": note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--load", default="per_round",
                        help="all, per_round, or both (comma-separated): alternated")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--note", default="")
    parser.add_argument("--stages", action="store_true",
                        help="in this process: per-round data-generation seconds")
    args = parser.parse_args()
    if args.stages:
        print(json.dumps(stages(devices=args.devices, per_round=args.per_round,
                                rounds=args.rounds, note=args.note)), flush=True)
        return
    loads = [s.strip() for s in args.load.split(",") if s.strip()]
    for i in range(args.repeat):
        for load in (loads if i % 2 == 0 else loads[::-1]):
            print(json.dumps(run(devices=args.devices, per_round=args.per_round,
                                 rounds=args.rounds, load=load, note=args.note)),
                  flush=True)


if __name__ == "__main__":
    main()
