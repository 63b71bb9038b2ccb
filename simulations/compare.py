"""Plots several runs' ``metrics.jsonl`` in one PNG (accuracy and loss against rounds) and
prints each run's final accuracy as a JSON line.

    python -m simulations.compare OUT.png RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from simulations.engine import RoundMetrics
from simulations.outputs import plot_runs


def read_metrics(directory: Path) -> list[RoundMetrics]:
    lines = (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [RoundMetrics(**json.loads(line)) for line in lines if line.strip()]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, dirs = Path(argv[0]), [Path(d) for d in argv[1:]]
    runs = {d.name: read_metrics(d) for d in dirs}
    plot_runs(runs, out, title="FedProx Synthetic(1,1)" if "fedprox" in str(out) else "")
    for name, rows in runs.items():
        final = next(m for m in reversed(rows) if m.test_accuracy is not None)
        print(json.dumps({"run": name, "rounds": len(rows), "final_accuracy": final.test_accuracy,
                          "final_train_loss": final.train_loss}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
