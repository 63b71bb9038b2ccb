"""core.aggregation.fedavg: the streaming weighted mean FedAvg aggregates with."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.aggregation import fedavg
from core.aggregation.fedavg import StreamingWeightedMean, is_finite, weighted_mean

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def federations(draw: st.DrawFn) -> tuple[list[np.ndarray], list[float], list[list[int]]]:
    """Updates of one size, positive weights, and for each update a chunking (cut points)."""
    size = draw(st.integers(0, 40))
    count = draw(st.integers(1, 6))
    updates = [draw(hnp.arrays(np.float32, size, elements=finite)) for _ in range(count)]
    weights = [draw(st.floats(0.01, 5000.0)) for _ in range(count)]
    cuts = [sorted(draw(st.lists(st.integers(0, size), max_size=6))) for _ in range(count)]
    return updates, weights, cuts


def reference(updates: list[np.ndarray], weights: list[float]) -> np.ndarray:
    return np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)


@settings(max_examples=150, deadline=None)
@given(federations(), st.randoms(use_true_random=False))
def test_any_chunking_in_any_order_gives_the_numpy_weighted_average(
    federation: tuple[list[np.ndarray], list[float], list[list[int]]], rnd: random.Random,
) -> None:
    updates, weights, cuts = federation
    acc = StreamingWeightedMean(updates[0].size)
    for update, weight, cut in zip(updates, weights, cuts, strict=True):
        bounds = [0, *cut, update.size]
        chunks = list(zip(bounds[:-1], bounds[1:], strict=True))
        rnd.shuffle(chunks)
        for start, end in chunks:
            acc.add_chunk(start, update[start:end], weight)
        acc.finish_update(weight)
    expected = reference(updates, weights)
    assert acc.count == len(updates)
    assert acc.total_weight == pytest.approx(sum(weights))
    mean = acc.mean()
    assert mean.dtype == np.float32 and mean.shape == (updates[0].size,)
    np.testing.assert_allclose(mean, expected, rtol=1e-6, atol=1e-3)


@settings(max_examples=50, deadline=None)
@given(federations())
def test_weighted_mean_equals_the_streaming_mean_with_whole_updates(
    federation: tuple[list[np.ndarray], list[float], list[list[int]]],
) -> None:
    updates, weights, _ = federation
    acc = StreamingWeightedMean(updates[0].size)
    for update, weight in zip(updates, weights, strict=True):
        acc.add_chunk(0, update, weight)
        acc.finish_update(weight)
    np.testing.assert_array_equal(weighted_mean(updates, weights), acc.mean())


def test_weighted_mean_keeps_the_update_shape() -> None:
    a = np.ones((2, 3), np.float32)
    mean = weighted_mean([a, 3 * a], [1.0, 3.0])
    assert mean.shape == (2, 3)
    np.testing.assert_array_equal(mean, np.full((2, 3), 2.5, np.float32))


def test_the_sum_is_kept_in_float64() -> None:
    # float32 accumulation would lose the small updates next to the large one.
    updates = [np.array([1e8], np.float32)] + [np.array([1.0], np.float32)] * 1000
    acc = StreamingWeightedMean(1)
    for u in updates:
        acc.add_chunk(0, u, 1.0)
        acc.finish_update(1.0)
    assert acc.mean()[0] == np.float32((1e8 + 1000) / 1001)


def test_an_empty_aggregate_has_no_mean() -> None:
    with pytest.raises(ValueError, match="no update was aggregated"):
        StreamingWeightedMean(3).mean()


def test_chunks_without_a_finished_update_do_not_count() -> None:
    acc = StreamingWeightedMean(2)
    acc.add_chunk(0, np.ones(2, np.float32), 1.0)
    assert acc.count == 0 and acc.total_weight == 0.0
    with pytest.raises(ValueError):
        acc.mean()


@pytest.mark.parametrize(("offset", "length"), [(2, 2), (-1, 1), (0, 4)])
def test_a_chunk_outside_the_update_is_refused(offset: int, length: int) -> None:
    with pytest.raises(ValueError, match="outside the update of 3"):
        StreamingWeightedMean(3).add_chunk(offset, np.ones(length, np.float32), 1.0)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_an_update_weight_must_be_positive_and_finite(weight: float) -> None:
    with pytest.raises(ValueError, match="positive and finite"):
        StreamingWeightedMean(1).finish_update(weight)


def test_weighted_mean_refuses_updates_of_different_shapes() -> None:
    with pytest.raises(ValueError, match=r"update 1 has shape \(2,\), update 0 has \(3,\)"):
        weighted_mean([np.ones(3, np.float32), np.ones(2, np.float32)], [1.0, 1.0])


def test_weighted_mean_needs_one_weight_per_update() -> None:
    with pytest.raises(ValueError, match="one weight per update"):
        weighted_mean([np.ones(3, np.float32)], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one update"):
        weighted_mean([], [])


@pytest.mark.parametrize(("values", "expected"), [
    (np.array([0.0, -1.5, 3e38], np.float32), True),
    (np.array([0.0, np.nan], np.float32), False),
    (np.array([np.inf], np.float64), False),
    (np.array([-np.inf], np.float32), False),
    (np.zeros(0, np.float32), True),
])
def test_is_finite_detects_nan_and_infinity(values: np.ndarray, expected: bool) -> None:
    assert is_finite(values) is expected


@pytest.mark.parametrize("size", [0, 1, 5, 6, 7, 13])
def test_the_mean_divided_block_by_block_equals_the_whole_division(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fedavg, "MEAN_BLOCK", 3)  # many blocks and a partial last one
    rng = np.random.default_rng(size)
    acc = StreamingWeightedMean(size)
    for weight in (3.0, 7.5):
        acc.add_chunk(0, rng.standard_normal(size).astype(np.float32), weight)
        acc.finish_update(weight)
    whole = (acc._sum / acc.total_weight).astype(np.float32)
    np.testing.assert_array_equal(acc.mean(), whole)


def test_the_mean_needs_no_float64_copy_of_the_sum() -> None:
    # A 100M-parameter model's sum is 800 MB of float64: dividing it whole would add that
    # much again (and the float32 result) at every release.
    size = 4 << 20
    acc = StreamingWeightedMean(size)
    acc.add_chunk(0, np.ones(size, np.float32), 2.0)
    acc.finish_update(2.0)
    tracemalloc.start()
    try:
        mean = acc.mean()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mean[0] == 1.0 and mean[-1] == 1.0
    assert peak < size * 4 + 2 * fedavg.MEAN_BLOCK * 8, f"peak {peak >> 20} MiB"
