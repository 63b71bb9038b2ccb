"""scikit-learn's bundled digits (1,797 8x8 images; nothing is downloaded), split non-IID.

A fixed, stratified 20% is held out as the global test set; the rest is divided among devices
with a per-class Dirichlet(alpha) partition (small alpha: each device sees few classes).
"""

from __future__ import annotations

import functools

import numpy as np

from core.data.dataset import LocalDataset, split_local

CLASSES = 10


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y.astype(np.int64), test_size=0.2, stratify=y, random_state=0)
    return x_pool, y_pool, x_test, y_test


def digits_test_set() -> LocalDataset:
    _, _, x_test, y_test = _digits()
    return LocalDataset(np.zeros((0, 64), np.float32), np.zeros((0,), np.int64),
                        x_test, y_test, CLASSES)


@functools.cache
def dirichlet_partition(num_shards: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    """Indices into the training pool per shard; every index in exactly one shard and every
    shard with at least two samples."""
    _, y, _, _ = _digits()
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_shards, int(alpha * 1e6)]))
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_shards, alpha))) * len(idx)).astype(int)[:-1]
        for s, part in enumerate(np.split(idx, cuts)):
            shards[s].extend(part.tolist())
    # Deterministic top-up: move samples from the largest shard to any shard below two.
    for s in range(num_shards):
        while len(shards[s]) < 2:
            donor = max(range(num_shards), key=lambda i: len(shards[i]))
            shards[s].append(shards[donor].pop())
    return tuple(np.array(sorted(sh), dtype=np.int64) for sh in shards)


def digits_shard(*, shard: int, num_shards: int, dirichlet: float = 0.5, seed: int = 0,
                 test_fraction: float = 0.2) -> LocalDataset:
    x, y, _, _ = _digits()
    if num_shards > len(y) // 2:
        raise ValueError(f"at most {len(y) // 2} shards of digits")
    idx = dirichlet_partition(num_shards, dirichlet, seed)[shard]
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_shards, shard, 7]))
    return split_local(x[idx], y[idx], test_fraction, rng, CLASSES)
