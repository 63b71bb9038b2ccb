"""L2 clipping bounds every update's norm by the clip norm and leaves short updates alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.privacy import ClippedSum, NoiseSource, clip_to_l2_norm, l2_norm

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(1, 200), elements=finite)
clip_norms = st.floats(1e-3, 1e4)


@settings(max_examples=200, deadline=None)
@given(vectors, clip_norms)
def test_no_clipped_update_exceeds_the_clip_norm(update: np.ndarray, clip: float) -> None:
    clipped, norm = clip_to_l2_norm(update, l2_clip_norm=clip)
    assert l2_norm(clipped) <= clip * (1 + 1e-6)
    assert norm == pytest.approx(float(np.linalg.norm(update.astype(np.float64))))
    assert clipped.dtype == update.dtype


@settings(max_examples=200, deadline=None)
@given(vectors, clip_norms)
def test_an_update_within_the_clip_norm_is_returned_unchanged(update: np.ndarray,
                                                              clip: float) -> None:
    norm = l2_norm(update)
    clipped, _ = clip_to_l2_norm(update, l2_clip_norm=max(clip, norm))
    np.testing.assert_array_equal(clipped, update)
    assert clipped is not update


@settings(max_examples=100, deadline=None)
@given(st.lists(vectors, min_size=1, max_size=4), clip_norms)
def test_a_dict_update_is_clipped_as_one_vector(parts: list[np.ndarray], clip: float) -> None:
    update = {f"layer{i}": part for i, part in enumerate(parts)}
    clipped, norm = clip_to_l2_norm(update, l2_clip_norm=clip)
    flat, flat_norm = clip_to_l2_norm(np.concatenate(parts), l2_clip_norm=clip)
    assert list(clipped) == list(update)
    assert norm == pytest.approx(flat_norm)
    np.testing.assert_allclose(np.concatenate(list(clipped.values())), flat, rtol=1e-6)


def test_clipping_keeps_the_direction_and_does_not_modify_the_input() -> None:
    update = np.array([3.0, 4.0])
    clipped, norm = clip_to_l2_norm(update, l2_clip_norm=1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    np.testing.assert_array_equal(update, [3.0, 4.0])


@pytest.mark.parametrize("clip", [0.0, -1.0, float("inf"), float("nan")])
def test_the_clip_norm_must_be_positive_and_finite(clip: float) -> None:
    with pytest.raises(ValueError, match="l2_clip_norm"):
        clip_to_l2_norm(np.ones(3), l2_clip_norm=clip)


def test_a_non_finite_update_is_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        clip_to_l2_norm(np.array([1.0, np.nan]), l2_clip_norm=1.0)


def test_central_clipped_sum_releases_the_noisy_mean_of_clipped_updates() -> None:
    acc = ClippedSum(2, l2_clip_norm=1.0)
    assert acc.add(np.array([3.0, 4.0])) == 5.0
    assert acc.add(np.array([0.1, 0.0])) == pytest.approx(0.1)
    exact = acc.release_mean(noise_multiplier=0.0, source=NoiseSource.seeded(0),
                             require_secure=False)
    np.testing.assert_allclose(exact, [0.35, 0.4])
    assert acc.norms == pytest.approx([5.0, 0.1])
