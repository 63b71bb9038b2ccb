"""The bmm trainer's lock-step group size against devices/s (the measurement behind
``simulations.cohort._GROUP_PARAM_BYTES``). The workload of benchmarks/simulation.py, our
engine only, in this process; one JSON line per (group bytes, threads).

    python benchmarks/simulation_groups.py [--model mlp] [--rounds 8] [--threads 1,2]
        [--bytes 524288,1048576,2097152,4194304,16777216]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.simulation import _run_in_process, make_workload  # noqa: E402
from simulations import cohort  # noqa: E402
from simulations.config import EngineKind  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--bytes", default="524288,1048576,2097152,4194304,16777216")
    args = ap.parse_args()
    torch.set_num_threads(1)
    workload = make_workload(rounds=args.rounds)
    for threads in (int(t) for t in args.threads.split(",")):
        for size in (int(b) for b in args.bytes.split(",")):
            cohort._GROUP_PARAM_BYTES = size
            measure, accuracy = _run_in_process(workload, args.model, EngineKind.AUTO, threads)
            print(json.dumps({"benchmark": "simulation_groups", "model": args.model,
                              "group_bytes": size, "threads": threads,
                              "devices_per_s": measure.summary(workload)["devices_per_s"],
                              "final_accuracy": round(accuracy, 4)}), flush=True)


if __name__ == "__main__":
    main()
