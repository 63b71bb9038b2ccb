"""The neighbour graph of SecAgg+ (Bell et al. 2020): the Harary graph H(n, k) over a random
permutation of the participants, i.e. participants on a randomly ordered ring, each joined to
the k/2 nearest on either side. k-regular for even k < n - 1; the complete graph otherwise
(the original protocol)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from core.secagg.errors import SecAggError


def neighbour_graph(nodes: Sequence[int], k: int, rng: random.Random
                    ) -> dict[int, frozenset[int]]:
    n = len(nodes)
    if len(set(nodes)) != n:
        raise SecAggError("graph nodes must be distinct")
    if k >= n - 1:
        everyone = frozenset(nodes)
        return {u: everyone - {u} for u in nodes}
    if k < 2 or k % 2:
        raise SecAggError(f"a Harary ring needs an even degree >= 2 below n - 1, got k={k}")
    ring = list(nodes)
    rng.shuffle(ring)
    half = k // 2
    return {
        u: frozenset(ring[(pos + step) % n] for step in range(-half, half + 1) if step)
        for pos, u in enumerate(ring)
    }
