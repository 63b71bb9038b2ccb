"""Accounting: pinned epsilons from the maintained accountants, calibration that never
overshoots, fixed-size sampling, and the epsilon distributed DP really spends on dropouts."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.privacy import (
    AccountingMethod,
    MechanismSteps,
    NoiseFloorError,
    Sampling,
    calibrate_noise,
    check_noise_floor,
    effective_noise_multiplier,
    epsilon,
    epsilon_of_history,
    min_reports_for_floor,
    received_epsilon,
)

PINNED = dict(noise_multiplier=1.5, sampling_rate=0.04, steps=2250, delta=1e-5)


def test_rdp_epsilon_is_pinned() -> None:
    assert epsilon(**PINNED, method="rdp") == pytest.approx(7.3291, abs=5e-5)


def test_prv_epsilon_is_pinned_and_tighter_than_rdp() -> None:
    # Opacus's own test pins 6.777395712150674 for this setting; Opacus 1.6 with the numpy and
    # scipy here returns 6.7791 (its upper bound at eps_error=0.01; the point estimate is
    # 6.7688, which dp-accounting's PLD accountant matches). The two differ by 0.0017, inside
    # the accountant's own stated error of 0.01, which is the tolerance the pin can claim.
    eps = epsilon(**PINNED, method=AccountingMethod.PRV)
    assert eps == pytest.approx(6.7774, abs=0.01)
    assert eps == pytest.approx(6.7791, abs=5e-5)  # this environment, exactly
    assert eps < epsilon(**PINNED, method="rdp")


def test_more_steps_or_less_noise_cost_more() -> None:
    base = epsilon(**PINNED)
    assert epsilon(**{**PINNED, "steps": 3000}) > base
    assert epsilon(**{**PINNED, "noise_multiplier": 1.2}) > base
    assert epsilon(**{**PINNED, "steps": 0}) == 0.0


def test_a_history_of_equal_mechanisms_costs_what_one_block_does() -> None:
    split = [MechanismSteps(1.5, 0.04, 1000), MechanismSteps(1.5, 0.04, 1250)]
    assert epsilon_of_history(split, delta=1e-5) == pytest.approx(epsilon(**PINNED))


@settings(max_examples=8, deadline=None)
@given(target=st.floats(0.5, 20.0), rate=st.floats(0.001, 0.2), steps=st.integers(1, 3000),
       delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_calibrated_noise_never_overshoots_the_target_epsilon(target: float, rate: float,
                                                              steps: int, delta: float) -> None:
    z = calibrate_noise(target_epsilon=target, sampling_rate=rate, steps=steps, delta=delta)
    assert epsilon(noise_multiplier=z, sampling_rate=rate, steps=steps, delta=delta) <= target
    # ... and is tight: 1% less noise would overshoot (or z is already tiny).
    slightly_less = z * 0.99
    assert z < 0.05 or epsilon(noise_multiplier=slightly_less, sampling_rate=rate, steps=steps,
                               delta=delta) > target


def test_prv_calibration_never_overshoots_either() -> None:
    z = calibrate_noise(target_epsilon=6.7791, sampling_rate=0.04, steps=2250, delta=1e-5,
                        method="prv", tolerance=0.01)
    assert epsilon(noise_multiplier=z, sampling_rate=0.04, steps=2250, delta=1e-5,
                   method="prv") <= 6.7791
    assert z == pytest.approx(1.5, rel=0.02)


def test_fixed_size_sampling_uses_replace_one_rdp_and_needs_the_population() -> None:
    fixed = epsilon(**PINNED, sampling=Sampling.FIXED_SIZE, population=1000)
    # Replace-one adjacency: twice the sensitivity of add/remove-one Poisson.
    assert fixed > epsilon(**PINNED)
    assert fixed == pytest.approx(52.3286, abs=1e-3)
    z = calibrate_noise(target_epsilon=8.0, sampling_rate=0.04, steps=2250, delta=1e-5,
                        sampling="fixed", population=1000)
    assert epsilon(noise_multiplier=z, sampling_rate=0.04, steps=2250, delta=1e-5,
                   sampling="fixed", population=1000) <= 8.0
    with pytest.raises(ValueError, match="population"):
        epsilon(**PINNED, sampling=Sampling.FIXED_SIZE)
    with pytest.raises(ValueError, match="RDP only"):
        epsilon(**PINNED, sampling=Sampling.FIXED_SIZE, population=1000, method="prv")


def test_a_fixed_size_history_costs_what_dp_accountings_own_composition_says() -> None:
    """Per-step curves are cached and added; the result must be the library's, exactly."""
    import dp_accounting
    from dp_accounting import rdp

    from core.privacy.accounting import _rdp_orders

    history = [MechanismSteps(1.0, 0.1, 60), MechanismSteps(1.3, 0.1, 40),
               MechanismSteps(0.8, 0.05, 7)]
    accountant = rdp.RdpAccountant(
        orders=list(_rdp_orders()),
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for item in history:
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            1000, round(item.sampling_rate * 1000),
            # dp-accounting's multiplier is over the replace-one sensitivity, 2C.
            dp_accounting.GaussianDpEvent(item.noise_multiplier / 2)), item.steps)
    assert epsilon_of_history(history, delta=1e-5, sampling="fixed", population=1000) == \
        accountant.get_epsilon(1e-5)


@pytest.mark.parametrize("z", [0.8, 2.0, 5.0])
def test_a_fixed_size_step_of_the_whole_population_is_the_gaussian_mechanism_of_sensitivity_2c(
    z: float,
) -> None:
    """Replacing one device's clipped update (norm <= C) by another moves the sum by up to
    2C: with everyone in every step and noise std z C, that is the Gaussian mechanism of
    multiplier z / 2 under add/remove-one (Poisson at rate 1), never the cheaper z."""
    fixed = epsilon(noise_multiplier=z, sampling_rate=1.0, steps=20, delta=1e-5,
                    sampling="fixed", population=50)
    assert fixed == pytest.approx(epsilon(noise_multiplier=z / 2, sampling_rate=1.0, steps=20,
                                          delta=1e-5), rel=1e-9)
    assert fixed > epsilon(noise_multiplier=z, sampling_rate=1.0, steps=20, delta=1e-5)


@pytest.mark.parametrize("bad", [dict(delta=0.0), dict(delta=1.0), dict(noise_multiplier=0.0),
                                 dict(sampling_rate=1.5), dict(steps=-1)])
def test_out_of_range_parameters_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        epsilon(**{**PINNED, **bad})  # type: ignore[arg-type]


def test_an_unreachable_target_is_refused() -> None:
    with warnings.catch_warnings(), pytest.raises(ValueError, match="not reachable"):
        warnings.filterwarnings("ignore", "Optimal order is the smallest alpha")
        calibrate_noise(target_epsilon=1e-9, sampling_rate=1.0, steps=10**6, delta=1e-9)


# -- distributed DP: what m of n reports really deliver ------------------------------------

def test_dropouts_shrink_the_noise_by_the_square_root_of_the_reporting_fraction() -> None:
    assert effective_noise_multiplier(noise_multiplier=1.0, devices_planned=100,
                                      devices_reported=100) == 1.0
    assert effective_noise_multiplier(noise_multiplier=1.0, devices_planned=100,
                                      devices_reported=64) == pytest.approx(0.8)
    assert effective_noise_multiplier(noise_multiplier=2.0, devices_planned=4,
                                      devices_reported=1) == pytest.approx(1.0)


def test_received_epsilon_grows_when_devices_drop_out() -> None:
    common = dict(noise_multiplier=1.0, sampling_rate=0.01, delta=1e-5)
    full = received_epsilon(rounds=[(100, 100)] * 50, **common)  # type: ignore[arg-type]
    dropped = received_epsilon(rounds=[(100, 100)] * 49 + [(100, 50)],  # type: ignore[arg-type]
                               **common)
    assert full == pytest.approx(epsilon(noise_multiplier=1.0, sampling_rate=0.01, steps=50,
                                         delta=1e-5))
    assert dropped > full
    expected = epsilon_of_history([MechanismSteps(1.0, 0.01, 49),
                                   MechanismSteps(math.sqrt(0.5), 0.01, 1)], delta=1e-5)
    assert dropped == pytest.approx(expected)


def test_a_round_below_the_noise_floor_must_abort_with_the_reports_it_needed() -> None:
    assert check_noise_floor(noise_multiplier=1.0, devices_planned=100, devices_reported=81,
                             min_noise_multiplier=0.9) == pytest.approx(0.9)
    with pytest.raises(NoiseFloorError, match=r"only 80 of 100.*at least 81 of 100") as info:
        check_noise_floor(noise_multiplier=1.0, devices_planned=100, devices_reported=80,
                          min_noise_multiplier=0.9)
    assert info.value.effective_noise_multiplier == pytest.approx(math.sqrt(0.8))
    assert min_reports_for_floor(noise_multiplier=1.0, devices_planned=100,
                                 min_noise_multiplier=1.1) is None
