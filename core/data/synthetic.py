"""Synthetic(alpha, beta) from the FedProx paper (Li et al., MLSys 2020).

For device k: u_k ~ N(0, alpha), B_k ~ N(0, beta); W_k ~ N(u_k, 1) (10 x 60), b_k ~ N(u_k, 1);
v_k ~ N(B_k, 1) per dimension; x ~ N(v_k, Sigma) with Sigma_jj = j^-1.2; y = argmax(W_k x + b_k).
alpha controls how much local models differ, beta how much local inputs differ. With
``iid=True`` every device shares one W, b and v (the paper's Synthetic-IID).
"""

from __future__ import annotations

import numpy as np

from core.data.dataset import LocalDataset, split_local

DIM = 60
CLASSES = 10


def synthetic_shard(*, alpha: float, beta: float, shard: int, num_shards: int, seed: int = 0,
                    iid: bool = False, test_fraction: float = 0.1) -> LocalDataset:
    """Device ``shard``'s data; deterministic in (seed, num_shards, shard) alone."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_shards, shard]))
    n = int(min(rng.lognormal(4, 2) + 50, 20000))
    model_rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0FFEE])) if iid else rng
    u = model_rng.normal(0, np.sqrt(alpha)) if not iid else 0.0
    b_mean = model_rng.normal(0, np.sqrt(beta)) if not iid else 0.0
    w = model_rng.normal(u, 1, size=(CLASSES, DIM))
    b = model_rng.normal(u, 1, size=CLASSES)
    v = model_rng.normal(b_mean, 1, size=DIM) if not iid else np.zeros(DIM)
    sigma = np.arange(1, DIM + 1, dtype=np.float64) ** -1.2
    x = rng.normal(v, np.sqrt(sigma), size=(n, DIM))
    y = np.argmax(x @ w.T + b, axis=1)
    return split_local(x, y, test_fraction, rng, CLASSES)
