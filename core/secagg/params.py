"""Choosing SecAgg+ parameters: the neighbour count k, the threshold t and the ring.

Each device's two secrets (its self-mask seed and its mask key) are Shamir-shared among its
k neighbours and itself: m = k + 1 holders, any t of whom reconstruct. Given the cohort size n,
the expected dropout rate d and the fraction a of devices that may collude with the server,
:func:`derive` takes the smallest k (the cheapest protocol) for which some t satisfies, with
C = floor(a n) corrupt devices placed before the random graph is drawn:

* security (failure <= 2^-40 over all n devices):
  - semi-honest server: fewer than t corrupt holders of any honest device's shares,
    P[Hyp(n-1, C, k) >= t] <= 2^-40 / n;
  - semi-malicious server, which may tell different holders different stories about who
    dropped: c + m < 2t, i.e. P[Hyp(n-1, C, k) >= 2t - m] <= 2^-40 / n (Bell et al. 2020);
  - the graph minus corrupt and dropped devices stays connected, so that no partial sum
    leaks: on the Harary ring this fails only with two runs of k/2 removed devices,
    C(n, 2) (a + d)^k <= 2^-40 (skipped for the complete graph, k = n - 1);
* correctness (failure <= 2^-20): every needed secret keeps t surviving holders:
  a survivor's seed t - 1 neighbours besides itself, a dropped device's key t neighbours,
  n (P[Bin(k, 1 - d) < t - 1] + d P[Bin(k, 1 - d) < t]) <= 2^-20.

Settings the published analysis cannot support are refused with the bound named:
a + 2d <= 0.9 for a semi-malicious server, a + d <= 0.9 for a semi-honest one.
k = n - 1 is the original protocol of Bonawitz et al. (2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core.secagg.errors import SecAggError
from core.types import SecAggAdversary, SecAggProtocol, SecureAggregation

SECURITY_BITS = 40
CORRECTNESS_BITS = 20


class SecAggParamError(SecAggError):
    """The settings cannot be made secure and correct; the message names the bound."""


#: The task's ``secure_aggregation`` section (core.types) is this module's input.
SecAggConfig = SecureAggregation
Adversary = SecAggAdversary


@dataclass(frozen=True)
class SecAggParams:
    """What every participant of one round uses; derived from a config and the cohort size."""

    num_devices: int
    neighbours: int
    threshold: int
    value_bits: int
    ring_bits: int
    clip: float
    weight_cap: int
    security_failure: float
    correctness_failure: float

    @property
    def holders(self) -> int:
        return self.neighbours + 1

    @property
    def complete(self) -> bool:
        return self.neighbours >= self.num_devices - 1


def derive(config: SecAggConfig, num_devices: int) -> SecAggParams:
    n = num_devices
    if n < 3:
        raise SecAggParamError(f"secure aggregation needs at least 3 devices, got {n}")
    a, d = config.corrupt_fraction, config.dropout
    if not (0 <= a < 1 and 0 <= d < 1):
        raise SecAggParamError(f"corrupt_fraction and dropout must be in [0, 1), got {a}, {d}")
    if config.adversary is Adversary.SEMI_MALICIOUS and a + 2 * d > 0.9:
        raise SecAggParamError(
            f"a + 2d = {a + 2 * d:.3g} breaks the bound a + 2d <= 0.9 for a semi-malicious "
            f"server (Bell et al. 2020) with a = {a} corrupt and d = {d} dropping"
        )
    if config.adversary is Adversary.SEMI_HONEST and a + d > 0.9:
        raise SecAggParamError(f"a + d = {a + d:.3g} breaks the bound a + d <= 0.9 for a "
                               "semi-honest server")
    if config.weight_cap < 1:
        raise SecAggParamError(f"weight_cap must be at least 1, got {config.weight_cap}")
    value_bits, ring_bits = _bits(config.bits, n, config.weight_cap)
    if config.protocol is SecAggProtocol.SECAGG or (config.neighbours is not None and config.neighbours >= n - 1):
        candidates = [n - 1]
    elif config.neighbours is not None:
        k = config.neighbours
        if k < 2:
            raise SecAggParamError(f"neighbours must be at least 2, got {k}")
        candidates = [k + (k % 2)]  # the Harary ring needs an even degree
    else:
        candidates = list(range(2, n - 1, 2)) + [n - 1]
    reasons: list[str] = []
    for k in candidates:
        found = _threshold_for(config, n, k, reasons)
        if found is not None:
            t, sec, cor = found
            return SecAggParams(n, k, t, value_bits, ring_bits, config.clip, config.weight_cap,
                                sec, cor)
    raise SecAggParamError(
        f"no (neighbours, threshold) makes {n} devices secure (failure <= 2^-{SECURITY_BITS}) "
        f"and correct (failure <= 2^-{CORRECTNESS_BITS}): {reasons[-1]}; lower the expected "
        "dropout or the corrupt fraction, or select more devices per round"
    )


def _threshold_for(config: SecAggConfig, n: int, k: int, reasons: list[str]
                   ) -> tuple[int, float, float] | None:
    """The smallest secure and correct threshold at degree k, or None (reason appended)."""
    from scipy import stats  # imported here: slow, and only needed when deriving

    m = k + 1
    corrupt = math.floor(config.corrupt_fraction * n)
    d = config.dropout
    ts = np.arange(1, m + 1)
    # c ~ Hyp(n-1, C, k): corrupt holders among an honest device's k neighbours.
    if config.adversary is Adversary.SEMI_MALICIOUS:
        security = n * stats.hypergeom.sf(2 * ts - m - 1, n - 1, corrupt, k)
        bound = "2t > k + 1 + corrupt holders (semi-malicious server)"
    else:
        security = n * stats.hypergeom.sf(ts - 1, n - 1, corrupt, k)
        bound = "t above the colluding holders (semi-honest server)"
    if k < n - 1:
        security = security + math.comb(n, 2) * (config.corrupt_fraction + d) ** k
        bound += " and a connected graph of honest survivors"
    # A survivor's seed needs t - 1 live neighbours (it holds a share itself); the key of a
    # device that dropped (probability d) needs t.
    correctness = n * (stats.binom.cdf(ts - 2, k, 1 - d) + d * stats.binom.cdf(ts - 1, k, 1 - d))
    secure = (security <= 2.0**-SECURITY_BITS) & (ts >= 2)
    correct = correctness <= 2.0**-CORRECTNESS_BITS
    if config.threshold is not None:
        t = max(2, math.ceil(config.threshold * m - 1e-9))
        if t > m:
            raise SecAggParamError(f"threshold {config.threshold} asks for {t} of {m} shares")
        if not secure[t - 1]:
            reasons.append(
                f"threshold t={t} of {m} holders (k={k}) breaks the bound {bound} with "
                f"{corrupt} corrupt devices: failure {security[t - 1]:.2g} > 2^-{SECURITY_BITS}")
            return None
        if not correct[t - 1]:
            reasons.append(f"threshold t={t} of {m} holders (k={k}) fails correctness with "
                           f"dropout {d}: failure {correctness[t - 1]:.2g}")
            return None
        return t, float(security[t - 1]), float(correctness[t - 1])
    ok = secure & correct
    if not ok.any():
        lowest = int(np.argmax(secure)) + 1 if secure.any() else None
        reasons.append(
            f"at k={k} the bound {bound} needs t >= {lowest or 'more than ' + str(m)} but "
            f"dropout {d} allows t <= {int(np.sum(correct))}"
        )
        return None
    t = int(ts[np.argmax(ok)])
    return t, float(security[t - 1]), float(correctness[t - 1])


def _bits(value_bits: int | None, n: int, weight_cap: int) -> tuple[int, int]:
    """Value bits q and ring bits R with n (2^q - 1) < 2^R: the sum never wraps."""
    growth = max(0, math.ceil(math.log2(n)))
    if value_bits is None:
        value_bits = min(24, 32 - growth)
        if value_bits < 12:
            value_bits = 24
    if not 8 <= value_bits <= 40:
        raise SecAggParamError(f"bits must be in [8, 40], got {value_bits}")
    if weight_cap > 2**value_bits - 1:
        raise SecAggParamError(f"weight_cap {weight_cap} does not fit in {value_bits} bits")
    need = value_bits + growth
    if need <= 32:
        return value_bits, 32
    if need <= 64:
        return value_bits, 64
    raise SecAggParamError(f"{value_bits} bits for {n} devices need a {need}-bit ring; max 64")
