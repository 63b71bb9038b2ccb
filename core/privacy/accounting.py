"""Privacy accounting: epsilon spent by repeated sampled Gaussian mechanisms, and the noise
multiplier that meets a target epsilon. Wraps maintained accountants, never a copy:

=============================  ===============  ==========================================
sampling                       method           analysis
=============================  ===============  ==========================================
``Sampling.POISSON``           ``RDP``          Opacus ``compute_rdp`` / ``get_privacy_spent``
                                                (Mironov et al. 2019, add/remove-one),
                                                orders = ``RDPAccountant.DEFAULT_ALPHAS``
``Sampling.POISSON``           ``PRV``          Opacus ``PRVAccountant`` (Gopi et al. 2021),
                                                upper bound with ``eps_error=0.01``
``Sampling.FIXED_SIZE``        ``RDP``          dp-accounting ``RdpAccountant`` with
                                                ``NeighboringRelation.REPLACE_ONE`` and
                                                ``SampledWithoutReplacementDpEvent``
                                                (Wang, Balle, Kasiviswanathan 2019)
=============================  ===============  ==========================================

Fixed-size sampling (``sample_size`` of ``population`` without replacement) is analysed
under *replace-one* adjacency, Poisson under *add/remove-one*. A ``noise_multiplier`` is
always the noise's std over the bound ``C`` on one record's contribution (what a DP round
clips to). Removing a record moves a sum by at most ``C``, replacing it by up to ``2C``, and
dp-accounting's ``GaussianDpEvent`` takes the std over the sensitivity *under the relation
analysed*: a fixed-size step is composed with ``noise_multiplier / 2``
(:data:`REPLACE_ONE_SENSITIVITY`). At ``sampling_rate`` 1 that is exactly the Gaussian
mechanism with sensitivity ``2C``. The two epsilons are not comparable. PRV for fixed-size
sampling is not offered (no maintained implementation); asking for it raises ValueError.

Pure functions; the per-step RDP curve of ``(q, z)`` is cached, so a coordinator checking the
budget before every round pays microseconds, not the ~20 ms of a fresh RDP computation.
Opacus (and so torch) and dp-accounting are imported on first use.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


class AccountingMethod(enum.Enum):
    RDP = "rdp"
    PRV = "prv"


class Sampling(enum.Enum):
    """How the participants of a step are drawn from the population."""

    #: Each member independently with probability ``sampling_rate``.
    POISSON = "poisson"
    #: Exactly ``round(sampling_rate * population)`` members, uniformly without replacement.
    FIXED_SIZE = "fixed"


#: Epsilon accuracy asked of the PRV accountant; the value returned is its upper bound.
PRV_EPS_ERROR = 0.01

#: How far replacing one record can move a sum of contributions clipped to ``C``, in units
#: of ``C``: a fixed-size (replace-one) step's multiplier is divided by it for dp-accounting.
REPLACE_ONE_SENSITIVITY = 2.0

#: Largest noise multiplier :func:`calibrate_noise` searches up to.
MAX_NOISE_MULTIPLIER = 1e4


@dataclass(frozen=True)
class MechanismSteps:
    """``steps`` repetitions of the sampled Gaussian mechanism with one noise multiplier
    and sampling rate (one element of a heterogeneous history)."""

    #: The noise's std over the bound on one record's contribution (not over the
    #: replace-one sensitivity: that conversion is the accountant's).
    noise_multiplier: float
    sampling_rate: float
    steps: int
    #: Fixed-size sampling only: the population and sample size this step actually drew
    #: from and drew (a coordinator's round records what its selection saw); None: the
    #: history's ``population`` and ``round(sampling_rate * population)``.
    population: int | None = None
    sample_size: int | None = None


def epsilon(*, noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            method: AccountingMethod | str = AccountingMethod.RDP,
            sampling: Sampling | str = Sampling.POISSON, population: int | None = None
            ) -> float:
    """The epsilon of ``steps`` sampled Gaussian mechanisms at (``noise_multiplier``,
    ``sampling_rate``), for ``delta``. ``population`` is required for fixed-size sampling
    (sample size = ``round(sampling_rate * population)``, at least 1).

    Raises:
        ValueError: a parameter out of range, ``population`` missing for fixed-size
            sampling, or PRV asked for fixed-size sampling.
    """
    return epsilon_of_history(
        [MechanismSteps(noise_multiplier, sampling_rate, steps)], delta=delta, method=method,
        sampling=sampling, population=population)


def epsilon_of_history(history: Sequence[MechanismSteps], *, delta: float,
                       method: AccountingMethod | str = AccountingMethod.RDP,
                       sampling: Sampling | str = Sampling.POISSON,
                       population: int | None = None) -> float:
    """The epsilon of a composition of mechanisms with varying noise (e.g. distributed-DP
    rounds where fewer devices than planned reported). Empty history: 0.

    Raises:
        ValueError: as :func:`epsilon`.
    """
    method = AccountingMethod(method)
    sampling = Sampling(sampling)
    _check_delta(delta)
    for item in history:
        _check_mechanism(item)
    history = [h for h in history if h.steps > 0 and h.sampling_rate > 0]
    if not history:
        return 0.0
    if sampling is Sampling.FIXED_SIZE:
        if method is not AccountingMethod.RDP:
            raise ValueError("fixed-size sampling is accounted with RDP only; use method=rdp "
                             "or Poisson sampling")
        if any(h.population is None for h in history) and (population is None
                                                           or population < 1):
            raise ValueError(f"fixed-size sampling needs population >= 1, got {population}")
        return _fixed_size_rdp_epsilon(tuple(history), delta, population or 0)
    if method is AccountingMethod.RDP:
        return _poisson_rdp_epsilon(tuple(history), delta)
    return _poisson_prv_epsilon(history, delta)


def calibrate_noise(*, target_epsilon: float, sampling_rate: float, steps: int, delta: float,
                    method: AccountingMethod | str = AccountingMethod.RDP,
                    sampling: Sampling | str = Sampling.POISSON, population: int | None = None,
                    tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier found (to relative ``tolerance``) whose epsilon is at
    most ``target_epsilon``. Never overshoots: the returned value's own epsilon, computed by
    :func:`epsilon` with the same arguments, is ``<= target_epsilon``.

    Raises:
        ValueError: ``target_epsilon`` not positive, other parameters as :func:`epsilon`, or
            the target unreachable below ``MAX_NOISE_MULTIPLIER``.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")

    def eps(z: float) -> float:
        return epsilon(noise_multiplier=z, sampling_rate=sampling_rate, steps=steps,
                       delta=delta, method=method, sampling=sampling, population=population)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"epsilon {target_epsilon} at delta {delta} is not reachable "
                             f"with a noise multiplier up to {MAX_NOISE_MULTIPLIER}")
    # Invariant: eps(high) <= target; low is 0 or has eps(low) > target.
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if eps(middle) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


# -- implementations ------------------------------------------------------------------------

def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _check_mechanism(item: MechanismSteps) -> None:
    if not (math.isfinite(item.noise_multiplier) and item.noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive and finite, got "
                         f"{item.noise_multiplier}")
    if not 0 <= item.sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in [0, 1], got {item.sampling_rate}")
    if item.steps < 0:
        raise ValueError(f"steps must be >= 0, got {item.steps}")
    if item.population is not None and item.population < 1:
        raise ValueError(f"population must be >= 1, got {item.population}")
    if item.sample_size is not None and not (
            1 <= item.sample_size <= (item.population or item.sample_size)):
        raise ValueError(f"sample_size must be in [1, population], got {item.sample_size} "
                         f"of {item.population}")


@functools.cache
def _rdp_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)


@functools.lru_cache(maxsize=1024)
def _poisson_rdp_per_step(sampling_rate: float, noise_multiplier: float
                          ) -> npt.NDArray[np.float64]:
    from opacus.accountants.analysis.rdp import compute_rdp

    curve = np.asarray(compute_rdp(q=sampling_rate, noise_multiplier=noise_multiplier, steps=1,
                                   orders=list(_rdp_orders())), dtype=np.float64)
    curve.setflags(write=False)
    return curve


@functools.lru_cache(maxsize=1024)  # a device's local DP asks the same each round
def _poisson_rdp_epsilon(history: tuple[MechanismSteps, ...], delta: float) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    total = sum(_poisson_rdp_per_step(h.sampling_rate, h.noise_multiplier) * h.steps
                for h in history)
    eps, _ = get_privacy_spent(orders=list(_rdp_orders()), rdp=total, delta=delta)
    return float(eps)


def _poisson_prv_epsilon(history: Sequence[MechanismSteps], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = [(h.noise_multiplier, h.sampling_rate, h.steps) for h in history]
    return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


@functools.lru_cache(maxsize=256)
def _fixed_size_rdp_epsilon(history: tuple[MechanismSteps, ...], delta: float,
                            population: int) -> float:
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    # RDP composes by addition: the library's own per-step curves, times their steps, and
    # its own conversion (what RdpAccountant.get_epsilon does after composing each event).
    total = sum(_fixed_size_rdp_per_step(*_fixed_size_draw(h, population),
                                         h.noise_multiplier / REPLACE_ONE_SENSITIVITY)
                * h.steps for h in history)
    return float(compute_epsilon(list(_rdp_orders()), total, delta)[0])


def _fixed_size_draw(item: MechanismSteps, population: int) -> tuple[int, int]:
    """(population, sample size) of one fixed-size step: its own record, else the
    history's population at its sampling rate."""
    n = item.population if item.population is not None else population
    if item.sample_size is not None:
        return n, item.sample_size
    return n, min(n, max(1, round(item.sampling_rate * n)))


@functools.lru_cache(maxsize=1024)
def _fixed_size_rdp_per_step(population: int, sample_size: int, noise_multiplier: float
                             ) -> npt.NDArray[np.float64]:
    """dp-accounting's RDP curve of one sampled-without-replacement Gaussian step whose noise
    std is ``noise_multiplier`` times the replace-one sensitivity (a third of a second to
    compute at population 1000; a coordinator asks for it twice a round)."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        orders=list(_rdp_orders()),
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_accounting.GaussianDpEvent(noise_multiplier)), 1)
    # The accountant's composed RDP, the array its get_epsilon converts.
    curve = np.array(accountant._rdp, dtype=np.float64)
    # Sampling never costs more than releasing the whole population's sum (quasi-convexity
    # of the Renyi divergence over the mixture of samples); the amplification bound is
    # looser than that for large q, so each order takes the smaller of the two.
    whole = rdp.RdpAccountant(
        orders=list(_rdp_orders()),
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    whole.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        population, population, dp_accounting.GaussianDpEvent(noise_multiplier)), 1)
    curve = np.minimum(curve, np.array(whole._rdp, dtype=np.float64))
    curve.setflags(write=False)
    return curve
