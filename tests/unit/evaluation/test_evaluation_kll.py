"""The KLL sketch (core.evaluation.kll): quantiles within its rank-error bound, merges of parts
that agree with the whole, level sizes that follow from the count alone, and the check of a
device's sketch region. Seeds are fixed: each test is deterministic."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.evaluation import kll

QS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def rank_interval(data: np.ndarray, value: float) -> tuple[float, float]:
    """The normalized ranks ``value`` spans in ``data``: (#< value, #<= value) / n."""
    s = np.sort(data)
    return (np.searchsorted(s, value, side="left") / s.size,
            np.searchsorted(s, value, side="right") / s.size)


def assert_within(data: np.ndarray, sketch: kll.KllSketch, bound: float) -> None:
    for q, value in zip(QS, kll.quantiles(sketch, QS), strict=True):
        low, high = rank_interval(data, value)
        distance = max(low - q, q - high, 0.0)
        assert distance <= bound, (q, value, low, high, bound)


def test_a_sketch_of_at_most_k_values_is_exact() -> None:
    data = np.random.default_rng(0).normal(size=150)
    sketch = kll.build(data, k=200, rng=np.random.default_rng(1))
    assert sketch.levels[0].size == 150 and sketch.variance == 0.0
    assert kll.rank_error_bound(sketch) == 0.0
    assert_within(data, sketch, 0.0)
    assert kll.quantiles(sketch, [0.0, 1.0]) == [data.min(), data.max()]


@pytest.mark.parametrize("seed", range(5))
def test_quantiles_of_a_known_distribution_are_within_the_bound(seed: int) -> None:
    data = np.random.default_rng(seed).exponential(size=200_000)
    sketch = kll.build(data, rng=np.random.default_rng(100 + seed))
    bound = kll.rank_error_bound(sketch)
    assert 0.0 < bound < 0.03
    assert sketch.retained <= kll.max_items(data.size, kll.DEFAULT_K)
    assert_within(data, sketch, bound)
    # The exponential's own quantiles, -ln(1 - q), to within the bound's ranks.
    for q, value in zip(QS, kll.quantiles(sketch, QS), strict=True):
        true_rank = 1.0 - math.exp(-value)
        assert abs(true_rank - q) <= bound + 0.01, q


@pytest.mark.parametrize("seed", range(5))
def test_merging_sketches_of_parts_agrees_with_the_sketch_of_the_whole(seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [rng.normal(loc=rng.normal(), size=rng.integers(50, 3000)) for _ in range(40)]
    whole = np.concatenate(parts)
    coins = np.random.default_rng(1000 + seed)
    merged = kll.build(parts[0], rng=coins)
    for part in parts[1:]:  # one by one, as reports arrive
        merged = kll.merge([merged, kll.build(part, rng=coins)], rng=coins)
    single = kll.build(whole, rng=coins)
    assert merged.n == whole.size
    merged_bound, single_bound = kll.rank_error_bound(merged), kll.rank_error_bound(single)
    assert merged_bound < 0.03
    assert_within(whole, merged, merged_bound)
    assert_within(whole, single, single_bound)
    for a, b in zip(kll.quantiles(merged, QS), kll.quantiles(single, QS), strict=True):
        ranks_a, ranks_b = rank_interval(whole, a), rank_interval(whole, b)
        gap = max(ranks_a[0] - ranks_b[1], ranks_b[0] - ranks_a[1], 0.0)
        assert gap <= merged_bound + single_bound


def test_a_merge_of_many_parts_at_once_is_a_sketch_of_their_union() -> None:
    rng = np.random.default_rng(7)
    parts = [rng.uniform(size=500) for _ in range(30)]
    merged = kll.merge([kll.build(p, rng=rng) for p in parts], rng=rng)
    assert merged.n == 15_000
    assert math.fsum(len(level) * 2.0 ** h for h, level in enumerate(merged.levels)) == 15_000
    assert_within(np.concatenate(parts), merged, kll.rank_error_bound(merged))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 20_000), k=st.sampled_from([8, 50, 200, 333]),
       seed=st.integers(0, 2**32 - 1))
def test_level_sizes_and_variance_follow_from_the_count_alone(n: int, k: int,
                                                              seed: int) -> None:
    rng = np.random.default_rng(seed)
    sketch = kll.build(rng.normal(size=n), k=k, rng=rng)
    assert tuple(len(level) for level in sketch.levels) == kll.level_sizes(n, k)
    assert sketch.variance == kll.build_variance(n, k)
    assert math.fsum(len(level) * 2.0 ** h for h, level in enumerate(sketch.levels)) == n
    assert sketch.retained <= kll.max_items(max(n, 1), k)
    region = kll.to_items(sketch, kll.max_items(max(n, 1), k))
    assert kll.items_problem(region, n, k=k, low=-math.inf, high=math.inf) is None
    parsed = kll.parse_items(region, n, k=k)
    assert parsed.n == n and parsed.variance == sketch.variance
    assert all(np.array_equal(a, b) for a, b in zip(parsed.levels, sketch.levels, strict=True))


def good_region(n: int = 1000, length: int = 700) -> np.ndarray:
    rng = np.random.default_rng(3)
    return kll.to_items(kll.build(rng.uniform(0, 4, size=n), rng=rng), length)


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda r: r[:100], r"holds \d+ items; the region has 100"),
    (lambda r: np.concatenate([r[:-1], [1.0]]), "the rest of its region must be 0"),
    (lambda r: np.where(np.arange(r.size) == 3, np.nan, r), "NaN or infinite"),
    (lambda r: np.where(np.arange(r.size) == 0, 9.0, r), "outside the metric's range"),
    (lambda r: np.concatenate([r[1::-1], r[2:]]), "is not sorted"),
], ids=["short", "padding", "nan", "range", "order"])
def test_a_malformed_sketch_region_is_refused_with_its_reason(tamper: object,
                                                              message: str) -> None:
    region = good_region()
    assert kll.items_problem(region, 1000, k=200, low=0.0, high=4.0) is None
    bad = tamper(region)  # type: ignore[operator]
    problem = kll.items_problem(bad, 1000, k=200, low=0.0, high=4.0)
    assert problem is not None
    assert re.search(message, problem), problem


def test_a_region_claiming_another_count_is_refused() -> None:
    region = good_region(n=1000)
    # 999 values make other level sizes: some item lands past them, or a level's order breaks.
    assert kll.items_problem(region, 999, k=200, low=0.0, high=4.0) is not None
    assert kll.items_problem(np.zeros(700), 0, k=200, low=0.0, high=4.0) is None


def test_bad_arguments_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        kll.build([1.0, math.nan], rng=rng)
    with pytest.raises(ValueError, match="k must be between 8 and 4096"):
        kll.build([1.0], k=4, rng=rng)
    with pytest.raises(ValueError, match="different k"):
        kll.merge([kll.build([1.0], k=8, rng=rng), kll.build([1.0], k=9, rng=rng)], rng=rng)
    with pytest.raises(ValueError, match="at least one"):
        kll.merge([], rng=rng)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        kll.quantiles(kll.build([1.0], rng=rng), [1.5])
    with pytest.raises(ValueError, match=">= 0"):
        kll.level_sizes(-1, 200)
    empty = kll.build([], rng=rng)
    assert math.isnan(kll.quantiles(empty, [0.5])[0]) and math.isnan(kll.rank_error_bound(empty))


def test_the_estimated_rank_of_a_value_is_within_the_bound() -> None:
    rng = np.random.default_rng(11)
    data = rng.lognormal(size=50_000)
    sketch = kll.build(data, rng=rng)
    bound = kll.rank_error_bound(sketch)
    for value in np.quantile(data, [0.05, 0.5, 0.95]):
        low, high = rank_interval(data, value)
        estimate = kll.rank(sketch, float(value))
        assert low - bound <= estimate <= high + bound


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 3000),
       values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                       min_size=0, max_size=700),
       sort=st.booleans())
def test_any_region_is_either_refused_with_a_reason_or_a_sketch_within_range(
        n: int, values: list[float], sort: bool) -> None:
    """What a device may send: whatever the floats, the check answers (never raises), and
    what it accepts parses into a sketch of n values within the range."""
    region = np.zeros(kll.max_items(3000, 200), dtype=np.float32)
    head = np.asarray(values, dtype=np.float32)
    region[:head.size] = np.sort(head) if sort else head
    problem = kll.items_problem(region, n, k=200, low=-1.0, high=1.0)
    if problem is None:
        sketch = kll.parse_items(region, n, k=200)
        assert sketch.n == n
        if n:
            assert all(-1.0 <= q <= 1.0 for q in kll.quantiles(sketch, QS))
    else:
        assert isinstance(problem, str) and problem
