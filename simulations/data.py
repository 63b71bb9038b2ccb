"""The federation's data: one training set per simulated device and one global test set.

Every source goes through the data-spec registry of :mod:`core.data.spec`, the one agents
use: device ``k`` of ``N`` loads ``SPEC,shard=k/N`` (see :func:`load_federated_data`), so a
simulated device holds what a real agent started with that spec holds, for the built-in
sources (``synthetic``: FedProx Synthetic(alpha, beta); ``digits``: scikit-learn digits,
Dirichlet non-IID) and for any source an app registers (:mod:`core.apps`).

:func:`iid_partition`, :func:`dirichlet_partition` and :func:`dataset_arrays` are plain
helpers for writing a data source over one central dataset (e.g. a torch ``Dataset``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, overload

import numpy as np

from core.data.dataset import LocalDataset
from simulations.config import DataConfig
from simulations.errors import SimulationConfigError
from simulations.memory import return_freed_heap, shared_empty


@dataclass(frozen=True, eq=False)
class FederatedData:
    """``x_train[k]`` float32 ``[n_k, *feature_shape]`` and ``y_train[k]`` int64 ``[n_k]``
    for device k (every ``n_k >= 1``); ``x_test``/``y_test`` the global test set.
    ``x_device_test[k]``/``y_device_test[k]``: device k's own held-out split (what an agent
    with its spec evaluates on; may be empty), or empty sequences when not loaded."""

    x_train: Sequence[np.ndarray]
    y_train: Sequence[np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    x_device_test: Sequence[np.ndarray] = ()
    y_device_test: Sequence[np.ndarray] = ()

    @property
    def num_devices(self) -> int:
        return len(self.y_train)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one example's features (``(64,)`` for flat digits)."""
        return tuple(int(d) for d in self.x_test.shape[1:])

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


def load_federated_data(config: DataConfig, *, source: str = "<simulation>",
                        shared_memory: bool = False) -> FederatedData:
    """Loads every device's data through the data-spec registry (:mod:`core.data.spec`):
    device ``k`` gets ``load_dataset(with_shard(spec, k, num_devices))``, the data an agent
    started with that spec trains on, whatever the source (built-in or an app's). The test
    set is ``test_data``'s test split, or the union of the devices' test splits.
    Deterministic in ``config`` (as deterministic as the sources). ``shared_memory``: the
    training table is allocated in shared memory (for worker processes to map: moving it
    there later holds it twice for a moment).

    Raises:
        SimulationConfigError: a spec is refused, a source fails, or the devices' data do
            not fit together; names ``source`` and the field the data came from.
    """
    from core.data.spec import load_dataset, parse_data_spec, with_shard
    from core.errors import CoreError

    def fail(name: str, message: str) -> NoReturn:
        raise SimulationConfigError(source, name, message)

    population = "simulation.population.data"
    n = config.num_devices
    shards: list[LocalDataset] = []
    try:
        spec = parse_data_spec(config.spec)
        for k in range(n):
            shards.append(load_dataset(with_shard(spec, k, n)))
    except (CoreError, ValueError) as exc:
        where = f" (device {len(shards)} of {n})" if n > 1 else ""
        fail(population, f"{exc}{where}")
    shape = _feature_shape(shards[0].x_train)
    for k, shard in enumerate(shards):
        if len(shard.y_train) == 0:
            fail(population, f"device {k} of {n} has no training examples")
        if _feature_shape(shard.x_train) != shape:
            fail(population, f"device {k} has features of shape "
                             f"{list(_feature_shape(shard.x_train))}, device 0 {list(shape)}")
    if config.test_data:
        try:
            test = load_dataset(config.test_data)
        except (CoreError, ValueError) as exc:
            fail("simulation.test_data", str(exc))
        x_test, y_test = test.x_test, test.y_test
        classes = max(test.classes, *(s.classes for s in shards))
        test_field = "simulation.test_data"
    else:
        x_test = np.concatenate([s.x_test for s in shards])
        y_test = np.concatenate([s.y_test for s in shards])
        classes = max(s.classes for s in shards)
        test_field = population
    if len(y_test) == 0:
        fail(test_field, "no test examples: name a test set with simulation.test_data (or "
                         "evaluation.server_data)")
    if _feature_shape(x_test) != shape:
        fail(test_field, f"test features of shape {list(_feature_shape(x_test))} do not fit "
                         f"the devices' {list(shape)}")
    return pack_shards(shards, x_test=x_test, y_test=y_test, num_classes=classes,
                       shared_memory=shared_memory)


def pack_shards(shards: list[LocalDataset], *, x_test: np.ndarray, y_test: np.ndarray,
                num_classes: int, shared_memory: bool = False) -> FederatedData:
    """The federation of ``shards`` (device k holds ``shards[k]``, whose features all have
    one shape; every one has a training example): their training splits copied into one
    table (:class:`PackedRows`, the layout :class:`simulations.cohort.DeviceTable` trains
    from), each shard's own training arrays released as they are copied (``shards`` is
    changed in place), and ``x_test``/``y_test`` as the global test set."""
    shape = _feature_shape(shards[0].x_train)
    x_train, y_train = _pack_training_data(shards, shape, shared_memory)
    return FederatedData(
        x_train=x_train, y_train=y_train,
        x_test=np.ascontiguousarray(x_test, dtype=np.float32),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64), num_classes=num_classes,
        x_device_test=[np.ascontiguousarray(s.x_test, dtype=np.float32) for s in shards],
        y_device_test=[np.ascontiguousarray(s.y_test, dtype=np.int64) for s in shards])


def _pack_training_data(shards: list[LocalDataset], shape: tuple[int, ...],
                        shared_memory: bool = False) -> tuple[PackedRows, PackedRows]:
    """Every device's training split copied into one table (plus a zero padding row, the
    layout :class:`simulations.cohort.DeviceTable` trains from), each shard's own arrays
    released as soon as they are copied: a federation's training data is held once."""
    sizes = [len(s.y_train) for s in shards]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    x, y = _table((int(offsets[-1]) + 1, *shape), np.float32, shared_memory), _table(
        (int(offsets[-1]) + 1,), np.int64, shared_memory)
    x[-1], y[-1] = 0, 0
    for k in range(len(shards)):
        if k % 512 == 511:
            return_freed_heap()  # as it goes: the copied shards and the table never both
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        x[lo:hi] = shards[k].x_train
        y[lo:hi] = shards[k].y_train
        # Keep the shard's test split, drop its training arrays (this copy replaces them).
        shards[k] = dataclasses.replace(shards[k], x_train=x[lo:hi], y_train=y[lo:hi])
    return_freed_heap()
    return PackedRows(x, offsets), PackedRows(y, offsets)


def _table(shape: tuple[int, ...], dtype: type, shared_memory: bool) -> np.ndarray:
    """An uninitialised array, in shared memory (torch's, which worker processes map
    when the tensor is sent to them) if asked."""
    if not shared_memory:
        return np.empty(shape, dtype=dtype)
    import torch

    # Pages are taken as the rows are copied in, while the devices' arrays are released.
    array: np.ndarray = shared_empty(
        shape, torch.from_numpy(np.empty(0, dtype=dtype)).dtype).numpy()
    return array


class PackedRows(Sequence[np.ndarray]):
    """Per-device arrays that are consecutive row ranges of one ``table``: item ``k`` is
    the view ``table[offsets[k]:offsets[k + 1]]``; rows past ``offsets[-1]`` are padding.
    Not thread-safe with :meth:`rebase`."""

    def __init__(self, table: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[-1] > len(table):
            raise ValueError(f"offsets must end within the table's {len(table)} rows")
        self._table, self._offsets = table, offsets

    @property
    def table(self) -> np.ndarray:
        """The whole table, padding rows included."""
        return self._table

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    def rebase(self, table: np.ndarray) -> None:
        """Reads from ``table`` from now on: the same rows elsewhere (e.g. moved to shared
        memory), so the old table is released once nothing else holds it.

        Raises:
            ValueError: ``table`` has another shape or dtype.
        """
        if table.shape != self._table.shape or table.dtype != self._table.dtype:
            raise ValueError(f"a {table.dtype} table of shape {table.shape} cannot replace "
                             f"the {self._table.dtype} {self._table.shape}")
        self._table = table

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, k: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, k: slice) -> Sequence[np.ndarray]: ...

    def __getitem__(self, k: int | slice) -> np.ndarray | Sequence[np.ndarray]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"device {k} of {len(self)}")
        k %= len(self)
        return self._table[int(self._offsets[k]):int(self._offsets[k + 1])]


def _feature_shape(x: np.ndarray) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape[1:])


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

