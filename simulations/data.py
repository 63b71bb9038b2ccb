"""The federation's data: one training set per simulated device and one global test set.

Sources (see :class:`~simulations.config.DataConfig`):

- ``synthetic``: FedProx Synthetic(alpha, beta), one :func:`core.data.synthetic.synthetic_shard`
  per device; the test set is the union of the devices' held-out parts (as in the paper).
- ``digits``: :func:`core.data.digits.digits_shard` per device; the test set is the global
  held-out digits split.
- ``torch``: any map-style torch ``Dataset`` of ``(features, label)`` items, returned with a
  test set by the configured factory, and split by :func:`iid_partition` or
  :func:`dirichlet_partition` (the partitioners are plain functions over labels, usable on
  their own).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulations.config import DataConfig, DataSource, PartitionKind


@dataclass(frozen=True, eq=False)
class FederatedData:
    """``x_train[k]`` float32 ``[n_k, features]`` and ``y_train[k]`` int64 ``[n_k]`` for device
    k (every ``n_k >= 1``); ``x_test``/``y_test`` the global test set."""

    x_train: Sequence[np.ndarray]
    y_train: Sequence[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_devices(self) -> int:
        return len(self.y_train)

    @property
    def num_features(self) -> int:
        return int(self.x_test.shape[1])

    def sizes(self) -> np.ndarray:
        """Training examples per device, int64 ``[num_devices]``."""
        return np.array([len(y) for y in self.y_train], dtype=np.int64)


def iid_partition(num_examples: int, num_devices: int, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """A uniformly random split of ``range(num_examples)`` into ``num_devices`` parts whose
    sizes differ by at most one (sorted index arrays).

    Raises:
        ValueError: fewer examples than devices.
    """
    if not 1 <= num_devices <= num_examples:
        raise ValueError(f"cannot split {num_examples} examples across {num_devices} devices")
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples), num_devices)]


def dirichlet_partition(labels: np.ndarray, num_devices: int, alpha: float,
                        rng: np.random.Generator, *, min_size: int = 1) -> list[np.ndarray]:
    """The usual per-class Dirichlet split: for every class, proportions
    ``p ~ Dir(alpha * 1)`` divide that class's examples across the devices. Devices left
    with fewer than ``min_size`` examples get them, deterministically, from the largest.
    Returns sorted index arrays; every index is in exactly one.

    Raises:
        ValueError: ``alpha`` not positive, or fewer than ``num_devices * min_size`` examples.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if num_devices < 1 or len(labels) < num_devices * min_size:
        raise ValueError(f"cannot give {num_devices} devices {min_size} of {len(labels)} examples")
    owner = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_devices, alpha)))[:-1]
                * len(members)).astype(np.int64)
        owner[members] = np.repeat(np.arange(num_devices),
                                   np.diff(cuts, prepend=0, append=len(members)))
    sizes = np.bincount(owner, minlength=num_devices)
    for device in np.flatnonzero(sizes < min_size):
        while sizes[device] < min_size:
            donor = int(np.argmax(sizes))
            owner[int(np.flatnonzero(owner == donor)[-1])] = device
            sizes[donor] -= 1
            sizes[device] += 1
    return [np.flatnonzero(owner == d) for d in range(num_devices)]


def load_federated_data(config: DataConfig) -> FederatedData:
    """Generates or loads the data ``config`` describes. Deterministic in ``config``.

    Raises:
        ValueError: the torch factory cannot be imported or returns something unusable.
    """
    return _SOURCES[config.source](config)


def _synthetic(config: DataConfig) -> FederatedData:
    from core.data.synthetic import CLASSES, synthetic_shard

    shards = [synthetic_shard(alpha=config.alpha, beta=config.beta, shard=k,
                              num_shards=config.num_devices, seed=config.seed, iid=config.iid)
              for k in range(config.num_devices)]
    return FederatedData(
        x_train=[s.x_train for s in shards], y_train=[s.y_train for s in shards],
        x_test=np.concatenate([s.x_test for s in shards]),
        y_test=np.concatenate([s.y_test for s in shards]), num_classes=CLASSES)


def _digits(config: DataConfig) -> FederatedData:
    from core.data.digits import CLASSES, digits_shard, digits_test_set

    # test_fraction=0: the devices' local splits are not used; the global test set is.
    shards = [digits_shard(shard=k, num_shards=config.num_devices, dirichlet=config.dirichlet,
                           seed=config.seed, test_fraction=0.0)
              for k in range(config.num_devices)]
    test = digits_test_set()
    return FederatedData(x_train=[s.x_train for s in shards], y_train=[s.y_train for s in shards],
                         x_test=test.x_test, y_test=test.y_test, num_classes=CLASSES)


def _torch(config: DataConfig) -> FederatedData:
    module_name, _, function_name = config.factory.partition(":")
    try:
        factory: Callable[[], tuple[Any, Any]] = getattr(importlib.import_module(module_name),
                                                         function_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"data.factory {config.factory!r}: {exc}") from None
    train, test = factory()
    x, y = dataset_arrays(train)
    x_test, y_test = dataset_arrays(test)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, config.num_devices]))
    if config.partition is PartitionKind.IID:
        parts = iid_partition(len(y), config.num_devices, rng)
    else:
        parts = dirichlet_partition(y, config.num_devices, config.dirichlet, rng)
    classes = int(max(y.max(), y_test.max())) + 1
    return FederatedData(x_train=[x[p] for p in parts], y_train=[y[p] for p in parts],
                         x_test=x_test, y_test=y_test, num_classes=classes)


def dataset_arrays(dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    """(float32 ``[n, features]`` flattened features, int64 ``[n]`` labels) of a map-style
    dataset of ``(features, label)`` items (torch tensors, numpy arrays or numbers)."""
    import torch

    items = [dataset[i] for i in range(len(dataset))]
    if not items:
        raise ValueError("the dataset is empty")
    x = torch.stack([torch.as_tensor(f, dtype=torch.float32).reshape(-1) for f, _ in items])
    y = torch.as_tensor([int(label) for _, label in items], dtype=torch.int64)
    return x.numpy(), y.numpy()


_SOURCES: dict[DataSource, Callable[[DataConfig], FederatedData]] = {
    DataSource.SYNTHETIC: _synthetic,
    DataSource.DIGITS: _digits,
    DataSource.TORCH: _torch,
}
