"""Run outputs: per-round metrics as JSON lines and CSV (written as rounds finish, so a long
run can be followed with ``tail -f``), and a PNG of accuracy and loss against rounds.

Files in the output directory: ``metrics.jsonl``, ``metrics.csv``, ``metrics.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from simulations.engine import RoundMetrics

FIELDS = [f.name for f in dataclasses.fields(RoundMetrics)]


class MetricsWriter:
    """Appends one round at a time to ``metrics.jsonl`` and ``metrics.csv`` in ``directory``
    (created; existing files are replaced). Use as a context manager."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._jsonl: IO[str] = (directory / "metrics.jsonl").open("w", encoding="utf-8")
        self._csv_file: IO[str] = (directory / "metrics.csv").open("w", newline="",
                                                                   encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=FIELDS)
        self._csv.writeheader()

    def write(self, metrics: RoundMetrics) -> None:
        row = metrics.as_dict()
        self._jsonl.write(json.dumps(row) + "\n")
        self._csv.writerow({k: "" if v is None else json.dumps(v) if isinstance(v, Mapping)
                            else v for k, v in row.items()})
        self._jsonl.flush()
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def plot_runs(runs: Mapping[str, Sequence[RoundMetrics]], path: Path, *, title: str = "") -> None:
    """Test accuracy and training loss (global model) against rounds, one line per run, as
    a PNG at ``path``. Uses matplotlib's Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        evaluated = [m for m in rows if m.test_accuracy is not None]
        rounds = [m.round for m in evaluated]
        acc_ax.plot(rounds, [m.test_accuracy for m in evaluated], label=label)
        loss_ax.plot(rounds, [m.train_loss if m.train_loss is not None else m.test_loss
                              for m in evaluated], label=label)
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    loss_ax.set(xlabel="round", ylabel="training loss (global model)", title="loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
