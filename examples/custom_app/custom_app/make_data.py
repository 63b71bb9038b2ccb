"""Writes the example's CSVs: ``python -m custom_app.make_data rows.csv [--users 40]``.

Tabular "sensor" data: 12 features, 4 classes, 40 users whose class mix and feature offsets
differ (non-IID), generated from a fixed seed (nothing is downloaded); and beside it
``holdout.csv``, 10 other users' rows, for evaluation on the coordinator and in simulation.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

FEATURES = 12
CLASSES = 4


def write(path: Path, *, users: int = 40, rows_per_user: int = 60, seed: int = 0,
          holdout_users: int = 10) -> Path:
    """Writes ``path`` and ``holdout.csv`` beside it; returns ``path``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.5, size=(CLASSES, FEATURES))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_users(path, range(users), centres, rows_per_user, rng)
    _write_users(path.with_name("holdout.csv"), range(users, users + holdout_users), centres,
                 rows_per_user, rng)
    return path


def _write_users(path: Path, users: range, centres: np.ndarray, rows_per_user: int,
                 rng: np.random.Generator) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["user", *(f"f{i}" for i in range(FEATURES)), "label"])
        for user in users:
            mix = rng.dirichlet(np.full(CLASSES, 0.8))
            offset = rng.normal(0.0, 0.3, size=FEATURES)
            labels = rng.choice(CLASSES, size=rows_per_user, p=mix)
            for label in labels:
                x = centres[label] + offset + rng.normal(0.0, 2.0, size=FEATURES)
                out.writerow([user, *(f"{v:.5f}" for v in x), int(label)])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.path, users=args.users, seed=args.seed))


if __name__ == "__main__":
    main()
