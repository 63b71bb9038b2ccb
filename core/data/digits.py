"""scikit-learn's bundled digits (1,797 8x8 images, 64 features scaled to [0, 1]; shipped
with scikit-learn, never downloaded), split non-IID across devices.

A fixed stratified 20% (360 images, ``random_state=0``) is the global held-out test set
(:func:`digits_test_set`). The other 1,437 images are the training pool, divided among
devices with the usual per-class Dirichlet partition: for each class, proportions
``p ~ Dir(alpha * 1_N)`` split that class's images across the N devices. Small alpha gives
each device few classes; large alpha approaches an IID split.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from core.data.dataset import LocalDataset, split_local

FEATURES = 64
CLASSES = 10
#: Images in the training pool (1,797 minus the 360 held out).
POOL_SIZE = 1437
#: Every device gets at least this many images.
MIN_SHARD_SIZE = 2
#: Most devices the pool can be split across.
MAX_SHARDS = POOL_SIZE // MIN_SHARD_SIZE


#: The held-out split, stored: the first POOL_SIZE entries are the pool's image indices in
#: the order ``train_test_split(..., test_size=0.2, stratify=y, random_state=0)`` gives them,
#: the rest the test set's. scikit-learn computed it (a unit test recomputes and compares);
#: stored, a process that loads digits neither imports scikit-learn (a second or two of a
#: device agent's start-up) nor splits.
SPLIT_FILE = Path(__file__).with_name("digits_split.npy")


def digits_csv() -> Path | None:
    """scikit-learn's bundled ``digits.csv.gz`` (what ``load_digits`` reads), found without
    importing scikit-learn; None where that file is not where it has always been."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """``load_digits(return_X_y=True)``: pixel values 0-16 (float64) and labels."""
    path = digits_csv()
    if path is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return x, y
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool x, pool y, test x, test y), loaded once per process. Read-only arrays."""
    x, y = _raw_digits()
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.load(SPLIT_FILE).astype(np.int64)
    if len(order) != len(y) or not np.array_equal(np.sort(order), np.arange(len(y))):
        raise RuntimeError(f"{SPLIT_FILE} does not split the {len(y)} digits images")
    pool, test = order[:POOL_SIZE], order[POOL_SIZE:]
    x_pool, x_test, y_pool, y_test = (np.ascontiguousarray(a) for a in (x[pool], x[test],
                                                                         y[pool], y[test]))
    for array in (x_pool, x_test, y_pool, y_test):
        array.setflags(write=False)  # shared by every caller through the cache
    return x_pool, y_pool, x_test, y_test


def digits_test_set() -> LocalDataset:
    """The global held-out set as ``x_test``/``y_test`` (360 images); the train split is
    empty (shapes ``(0, 64)`` and ``(0,)``). The arrays are fresh, writable copies."""
    _, _, x_test, y_test = _digits()
    return LocalDataset(
        x_train=np.zeros((0, FEATURES), np.float32), y_train=np.zeros((0,), np.int64),
        x_test=x_test.copy(), y_test=y_test.copy(), classes=CLASSES,
    )


def dirichlet_partition(*, num_shards: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    """Indices into the training pool, one sorted read-only array per shard.

    Every pool index is in exactly one shard and every shard has at least two. Deterministic
    in (num_shards, alpha, seed); cached per process.

    Raises:
        ValueError: ``num_shards`` outside ``[1, MAX_SHARDS]``, ``alpha`` not positive and
            finite, or a negative seed.
    """
    if not 1 <= num_shards <= MAX_SHARDS:
        raise ValueError(f"digits supports 1 to {MAX_SHARDS} shards, got {num_shards}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"the Dirichlet alpha must be positive and finite, got {alpha}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return _dirichlet_partition(num_shards, float(alpha), seed)


@functools.cache
def _dirichlet_partition(num_shards: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    _, y, _, _ = _digits()
    alpha_bits = int(np.float64(alpha).view(np.uint64))
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_shards, alpha_bits]))
    owner = np.empty(len(y), dtype=np.int64)  # pool index -> shard
    for c in range(CLASSES):
        members = rng.permutation(np.flatnonzero(y == c))
        proportions = rng.dirichlet(np.full(num_shards, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        owner[members] = np.repeat(np.arange(num_shards), np.diff(cuts, prepend=0,
                                                                   append=len(members)))
    _top_up(owner, num_shards)
    shards = tuple(np.flatnonzero(owner == s) for s in range(num_shards))
    for shard in shards:
        shard.setflags(write=False)
    return shards


def _top_up(owner: np.ndarray, num_shards: int) -> None:
    """Moves images, deterministically, from the largest shards to any with fewer than
    MIN_SHARD_SIZE, so no device is left without data (possible for small alpha)."""
    sizes = np.bincount(owner, minlength=num_shards)
    for shard in np.flatnonzero(sizes < MIN_SHARD_SIZE):
        while sizes[shard] < MIN_SHARD_SIZE:
            donor = int(np.argmax(sizes))  # has > MIN_SHARD_SIZE since num_shards <= MAX
            moved = int(np.flatnonzero(owner == donor)[-1])
            owner[moved] = shard
            sizes[donor] -= 1
            sizes[shard] += 1


def digits_shard(*, shard: int, num_shards: int, dirichlet: float = 0.5, seed: int = 0,
                 test_fraction: float = 0.2) -> LocalDataset:
    """Device ``shard`` of ``num_shards`` (0-based): its Dirichlet part of the pool, split
    locally into train and test by ``test_fraction`` (at least one training image).

    Deterministic in (shard, num_shards, dirichlet, seed).

    Raises:
        ValueError: ``shard`` outside ``[0, num_shards)``, ``test_fraction`` outside [0, 1),
            or as :func:`dirichlet_partition`.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    indices = dirichlet_partition(num_shards=num_shards, alpha=dirichlet, seed=seed)[shard]
    x, y, _, _ = _digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_shards, shard, 1]))
    return split_local(x[indices], y[indices], test_fraction=test_fraction, rng=rng,
                       classes=CLASSES)
