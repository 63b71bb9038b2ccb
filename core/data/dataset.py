"""A device's local data: a train split it learns from and a test split it may evaluate on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# eq=False: the generated __eq__ would compare arrays element-wise and fail on truth value;
# two datasets are equal only if they are the same object.
@dataclass(frozen=True, eq=False)
class LocalDataset:
    """Features are float32 ``[n, num_features]``, labels int64 ``[n]`` in
    ``[0, classes)``. ``classes`` is fixed by the generator, so a device that happens to hold
    only some labels still reports the full count.

    Raises:
        ValueError: (on construction) features are not 2-D, the two splits have different
            feature counts, or a split has more or fewer labels than rows.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    def __post_init__(self) -> None:
        if self.x_train.ndim != 2 or self.x_test.ndim != 2:
            raise ValueError("features must be 2-D [samples, features]")
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(f"train has {self.x_train.shape[1]} features, "
                             f"test has {self.x_test.shape[1]}")
        if len(self.y_train) != len(self.x_train) or len(self.y_test) != len(self.x_test):
            raise ValueError("each split needs exactly one label per row")

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return self.classes


def split_local(x: np.ndarray, y: np.ndarray, *, test_fraction: float,
                rng: np.random.Generator, classes: int) -> LocalDataset:
    """Shuffles one device's samples and holds out ``round(n * test_fraction)`` of them for
    testing, keeping at least one for training (so ``n >= 1`` is required).

    Raises:
        ValueError: ``test_fraction`` is outside [0, 1) or there are no samples.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if len(y) == 0:
        raise ValueError("a device needs at least one sample")
    order = rng.permutation(len(y))
    n_test = min(int(round(len(y) * test_fraction)), len(y) - 1)
    test, train = order[:n_test], order[n_test:]
    return LocalDataset(
        x_train=x[train].astype(np.float32), y_train=y[train].astype(np.int64),
        x_test=x[test].astype(np.float32), y_test=y[test].astype(np.int64), classes=classes,
    )
