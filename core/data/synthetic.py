"""Synthetic(alpha, beta) from the FedProx paper (Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020), 60 features and 10 classes.

For device k::

    u_k ~ N(0, alpha)        B_k ~ N(0, beta)
    W_k ~ N(u_k, 1)  [10 x 60]      b_k ~ N(u_k, 1)  [10]
    v_k ~ N(B_k, 1)  [60]
    x   ~ N(v_k, Sigma),  Sigma diagonal, Sigma_jj = j^-1.2  (j = 1..60)
    y   = argmax softmax(W_k x + b_k)

alpha controls how much the devices' labelling functions differ, beta how much their inputs
differ. As in the authors' generator, alpha and beta are the *standard deviations* of u_k and
B_k (``np.random.normal(0, alpha)``); for the usual Synthetic(1, 1) both readings agree.
A device holds ``min(floor(lognormal(4, 2)) + 50, 20000)`` samples, 10% of them held out.

``iid=True`` is Synthetic-IID: every device shares one W ~ N(0, 1), b ~ N(0, 1) (drawn from
``seed`` alone) and v = 0, so all devices sample one distribution; alpha and beta are unused.
"""

from __future__ import annotations

import numpy as np

from core.data.dataset import LocalDataset, split_local

DIM = 60
CLASSES = 10
MAX_SAMPLES = 20000

# Second SeedSequence word of the shared IID model: distinct from any (num_shards, shard).
_IID_STREAM = 0x11D


def synthetic_shard(*, alpha: float, beta: float, shard: int, num_shards: int, seed: int = 0,
                    iid: bool = False, test_fraction: float = 0.1) -> LocalDataset:
    """Device ``shard`` of ``num_shards`` (0-based).

    Deterministic in (seed, num_shards, shard, alpha, beta, iid): the device's generator is
    seeded with ``SeedSequence([seed, num_shards, shard])``, so a shard never depends on
    which other shards were generated.

    Raises:
        ValueError: alpha or beta negative or not finite, ``shard`` outside
            ``[0, num_shards)``, a negative seed, or ``test_fraction`` outside [0, 1).
    """
    if not (np.isfinite(alpha) and np.isfinite(beta) and alpha >= 0 and beta >= 0):
        raise ValueError(f"alpha and beta must be finite and >= 0, got {alpha}, {beta}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_shards, shard]))
    n = min(int(rng.lognormal(4.0, 2.0)) + 50, MAX_SAMPLES)
    if iid:
        shared = np.random.default_rng(np.random.SeedSequence([seed, _IID_STREAM]))
        w = shared.normal(0.0, 1.0, size=(CLASSES, DIM))
        b = shared.normal(0.0, 1.0, size=CLASSES)
        v = np.zeros(DIM)
    else:
        u = rng.normal(0.0, alpha)
        big_b = rng.normal(0.0, beta)
        w = rng.normal(u, 1.0, size=(CLASSES, DIM))
        b = rng.normal(u, 1.0, size=CLASSES)
        v = rng.normal(big_b, 1.0, size=DIM)
    std = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    # Labels come from the float32 features a device actually stores, so they agree exactly.
    x = rng.normal(v, std, size=(n, DIM)).astype(np.float32)
    y = np.argmax(x.astype(np.float64) @ w.T + b, axis=1)  # softmax is monotonic
    return split_local(x, y, test_fraction=test_fraction, rng=rng, classes=CLASSES)
