"""A device's local data: a train split it learns from and a test split it may evaluate on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LocalDataset:
    x_train: np.ndarray  # float32 [n, d]
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1] if self.x_train.ndim == 2 else self.x_test.shape[1])

    @property
    def num_classes(self) -> int:
        return self.classes


def split_local(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator,
                classes: int) -> LocalDataset:
    """Shuffles and splits one device's samples; keeps at least one training sample."""
    order = rng.permutation(len(y))
    n_test = min(int(round(len(y) * test_fraction)), max(0, len(y) - 1))
    test, train = order[:n_test], order[n_test:]
    return LocalDataset(
        x[train].astype(np.float32), y[train].astype(np.int64),
        x[test].astype(np.float32), y[test].astype(np.int64), classes,
    )
