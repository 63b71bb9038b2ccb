"""FedBuff against synchronous FedAvg in simulation: simulated time and device compute to a
target test accuracy, on the same heterogeneous population, one JSON line per (seed, mode)
and one with the ratios. The workload is a task file with a ``simulation.compare`` section
(default: simulations/examples/fedbuff_vs_fedavg.yaml); the seed replaces the file's.

    python benchmarks/async.py [--file TASK.yaml] [--seeds 0,1,2] [--target 0.9]
        [--over-selection 1.3]

``--over-selection`` replaces the file's for the synchronous baseline: it then aggregates the
first ``clients_per_round`` of that many times more admitted devices (the usual remedy for
stragglers). Its device compute counts only the aggregated devices' training, not the late
ones' discarded work, which flatters it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.config import load_simulation_file  # noqa: E402
from simulations.modes import compare_modes  # noqa: E402

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "simulations/examples/fedbuff_vs_fedavg.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--target", type=float, help="default: the file's compare.target_accuracy")
    ap.add_argument("--over-selection", type=float, help="default: the file's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_simulation_file(args.file)
    if args.over_selection is not None:
        base = dataclasses.replace(base, selection=dataclasses.replace(
            base.selection, over_selection=args.over_selection))
    target = args.target or (base.compare.target_accuracy if base.compare else 0.9)
    agg = base.aggregation
    common = {"benchmark": "async", "file": str(args.file.relative_to(Path.cwd())
                                                 if args.file.is_relative_to(Path.cwd())
                                                 else args.file),
              "devices": base.data.num_devices, "data": base.data.spec,
              "clients_per_round": base.selection.clients_per_round,
              "over_selection": base.selection.over_selection, "buffer": agg.buffer,
              "max_concurrency": agg.max_concurrency,
              "staleness": f"{agg.staleness.kind.value}:{agg.staleness.exponent:g}",
              "max_staleness": agg.max_staleness, "target_accuracy": target,
              "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(["python", *sys.argv])}
    for seed in (int(s) for s in args.seeds.split(",")):
        config = dataclasses.replace(base, seed=seed)
        start = time.perf_counter()
        result = compare_modes(config, target)
        wall = round(time.perf_counter() - start, 1)
        for mode in ("async", "sync"):
            print(json.dumps({**common, "seed": seed, **result[mode].as_dict()}), flush=True)
        print(json.dumps({**common, "seed": seed, "mode": "ratio",
                          "time_speedup": result["time_speedup"],
                          "compute_ratio": result["compute_ratio"], "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
