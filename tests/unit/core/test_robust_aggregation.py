"""core.aggregation.robust: the rules that keep a minority of poisoned updates from steering
the model, as properties over stacks of updates."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.aggregation.robust import (
    RobustAggregationError,
    coordinate_median,
    krum,
    krum_scores,
    multi_krum,
    norm_bounded_mean,
    robust_aggregate,
    trimmed_mean,
)
from core.types import RobustAggregation, RobustKind

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def rounds(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 8))
    updates = draw(hnp.arrays(np.float32, (n, d), elements=finite))
    weights = np.asarray([draw(st.floats(0.5, 100.0)) for _ in range(n)])
    return updates, weights


def honest_and_attackers(honest: int, attackers: int, d: int = 20, *, seed: int = 0,
                         attack: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
    """Honest updates around (1, ..., 1) with small noise, then ``attackers`` huge ones."""
    rng = np.random.default_rng(seed)
    good = 1.0 + 0.05 * rng.standard_normal((honest, d))
    bad = attack * (1.0 + rng.random((attackers, d)))
    return np.concatenate([good, bad]), np.ones(honest + attackers)


@settings(max_examples=60, deadline=None)
@given(rounds())
def test_trimmed_mean_with_trim_zero_is_the_weighted_mean(case: tuple[np.ndarray, np.ndarray]
                                                          ) -> None:
    updates, weights = case
    expected = np.average(updates.astype(np.float64), axis=0, weights=weights)
    got = trimmed_mean(updates, weights, trim_fraction=0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    rule = RobustAggregation(kind=RobustKind.TRIMMED_MEAN, trim_fraction=0.0)
    np.testing.assert_allclose(robust_aggregate(updates, weights, rule).mean, expected,
                               rtol=1e-9, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(rounds())
def test_every_coordinate_rule_stays_within_the_updates_range(
        case: tuple[np.ndarray, np.ndarray]) -> None:
    updates, weights = case
    updates = updates.astype(np.float64)
    low, high = updates.min(axis=0) - 1e-6, updates.max(axis=0) + 1e-6
    for kind in (RobustKind.MEAN, RobustKind.MEDIAN, RobustKind.TRIMMED_MEAN):
        mean = robust_aggregate(updates, weights, RobustAggregation(kind=kind)).mean
        assert ((mean >= low) & (mean <= high)).all(), kind


def test_median_ignores_a_minority_of_huge_outliers() -> None:
    updates, weights = honest_and_attackers(honest=6, attackers=5)
    median = coordinate_median(updates)
    assert np.abs(median - 1.0).max() < 0.2
    mean = robust_aggregate(updates, weights, RobustAggregation()).mean
    assert np.abs(mean - 1.0).max() > 1000  # the plain mean is captured


def test_trimmed_mean_drops_as_many_outliers_as_it_trims() -> None:
    updates, weights = honest_and_attackers(honest=8, attackers=2)
    got = trimmed_mean(updates, weights, trim_fraction=0.2)  # k = 2 at each end
    assert np.abs(got - 1.0).max() < 0.1


@pytest.mark.parametrize("attackers", [1, 2, 3])
def test_krum_picks_an_honest_update_against_f_attackers(attackers: int) -> None:
    updates, weights = honest_and_attackers(honest=2 * attackers + 3, attackers=attackers,
                                            attack=3.0, seed=attackers)
    chosen = krum(updates, byzantine=attackers)
    assert chosen < 2 * attackers + 3
    result = robust_aggregate(updates, weights,
                              RobustAggregation(kind=RobustKind.KRUM, byzantine=attackers))
    np.testing.assert_array_equal(result.mean, updates[chosen])
    assert result.kept.sum() == 1 and result.kept[chosen]
    assert result.metrics["robust_kept"] == 1.0


def test_krum_against_colluding_attackers_that_agree() -> None:
    # f identical attackers are each other's nearest neighbours (distance 0), but with
    # n - f - 2 neighbours counted each must still reach into the honest cluster.
    rng = np.random.default_rng(3)
    honest = 1.0 + 0.05 * rng.standard_normal((7, 10))
    bad = np.full((2, 10), -5.0)
    updates = np.concatenate([honest, bad])
    assert krum(updates, byzantine=2) < 7


def test_krum_scores_match_the_definition() -> None:
    rng = np.random.default_rng(1)
    updates = rng.standard_normal((7, 5))
    f = 2
    scores = krum_scores(updates, byzantine=f)
    for i in range(7):
        d = sorted(float(np.sum((updates[i] - updates[j]) ** 2)) for j in range(7) if j != i)
        assert scores[i] == pytest.approx(sum(d[:7 - f - 2]))


def test_krum_refuses_too_few_updates_for_f() -> None:
    updates = np.zeros((6, 3))
    with pytest.raises(RobustAggregationError, match=r"aggregation.robust.byzantine.*2f \+ 3"):
        krum(updates, byzantine=2)  # needs 7
    assert krum(np.zeros((7, 3)), byzantine=2) == 0


def test_multi_krum_averages_the_best_and_excludes_attackers() -> None:
    updates, weights = honest_and_attackers(honest=9, attackers=2, attack=5.0)
    mean, kept = multi_krum(updates, weights, byzantine=2)
    assert kept.sum() == 9 and kept[:9].all() and not kept[9:].any()
    np.testing.assert_allclose(mean, updates[:9].mean(axis=0))
    _, kept3 = multi_krum(updates, weights, byzantine=2, m=3)
    assert kept3.sum() == 3
    with pytest.raises(RobustAggregationError, match="multi_krum_m"):
        multi_krum(updates, weights, byzantine=2, m=12)


def test_norm_bound_caps_the_influence_of_any_one_update() -> None:
    rng = np.random.default_rng(2)
    honest = rng.standard_normal((9, 16))
    for scale in (1e2, 1e6):
        attacker = scale * rng.standard_normal((1, 16))
        updates = np.concatenate([honest, attacker])
        mean, bound, clipped = norm_bounded_mean(updates, np.ones(10), bound=3.0)
        assert bound == 3.0 and clipped >= 1
        # Its share of the mean is at most bound / n, whatever its size.
        honest_part = np.sum(
            [u * min(1.0, 3.0 / np.linalg.norm(u)) for u in honest], axis=0) / 10
        assert np.linalg.norm(mean - honest_part) <= 3.0 / 10 + 1e-9


def test_adaptive_norm_bound_follows_the_median_norm() -> None:
    updates = np.diag([1.0, 2.0, 3.0, 4.0, 100.0])
    rule = RobustAggregation(kind=RobustKind.NORM_BOUND, norm_bound=None, norm_multiplier=2.0)
    result = robust_aggregate(updates, np.ones(5), rule)
    assert result.metrics["robust_norm_bound"] == pytest.approx(6.0)  # 2 x median 3
    assert result.metrics["robust_clipped"] == 1.0
    assert result.mean[4] == pytest.approx(6.0 / 5)


def test_weights_must_match_and_be_positive() -> None:
    with pytest.raises(ValueError, match="one weight per update"):
        robust_aggregate(np.zeros((3, 2)), [1.0, 1.0], RobustAggregation())
    with pytest.raises(ValueError, match="positive"):
        robust_aggregate(np.zeros((2, 2)), [1.0, 0.0], RobustAggregation())
    with pytest.raises(ValueError, match="stack"):
        robust_aggregate(np.zeros((0, 2)), [], RobustAggregation())
