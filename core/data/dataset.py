"""A device's local data: a train split it learns from and a test split it may evaluate on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.types import DataSchema


# eq=False: the generated __eq__ would compare arrays element-wise and fail on truth value;
# two datasets are equal only if they are the same object.
@dataclass(frozen=True, eq=False)
class LocalDataset:
    """Features are float32 ``[n, *feature_shape]`` (``[n, 64]`` for flat digits, ``[n, 1,
    28, 28]`` for images), labels int64 ``[n]`` in ``[0, classes)``. ``classes`` is fixed by
    the source, so a device that happens to hold only some labels still reports the full
    count.

    Raises:
        ValueError: (on construction) features have no example axis plus at least one
            feature axis, the two splits have different feature shapes, a split has more or
            fewer labels than rows, or ``classes`` is below 1.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    def __post_init__(self) -> None:
        if self.x_train.ndim < 2 or self.x_test.ndim < 2:
            raise ValueError("features must be [samples, *feature_shape] with at least one "
                             "feature axis")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train examples have shape {list(self.x_train.shape[1:])}, "
                             f"test examples {list(self.x_test.shape[1:])}")
        if len(self.y_train) != len(self.x_train) or len(self.y_test) != len(self.x_test):
            raise ValueError("each split needs exactly one label per row")
        if self.classes < 1:
            raise ValueError(f"classes must be at least 1, got {self.classes}")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example's features."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        """Features per example, flattened."""
        return int(np.prod(self.feature_shape))

    @property
    def schema(self) -> DataSchema:
        """What agents report at check-in, and what a task's ``data_schema`` declares."""
        return DataSchema(self.feature_shape, self.classes)

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
