"""Bounds on one update's influence and on a model before it is committed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.aggregation.bounds import StreamingL2Norm, capped_weight, model_problem


def test_a_weight_is_the_example_count_up_to_the_cap() -> None:
    assert capped_weight(10, weight_cap=1024) == 10
    assert capped_weight(2**31, weight_cap=1024) == 1024
    with pytest.raises(ValueError, match="at least 1"):
        capped_weight(0, weight_cap=1024)


def test_with_the_cap_one_device_cannot_own_the_mean() -> None:
    honest = [capped_weight(n, weight_cap=1024) for n in (50, 80, 120)]
    attacker = capped_weight(2**31 - 1, weight_cap=1024)
    assert attacker / (attacker + sum(honest)) < 0.85


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, st.integers(0, 300),
                  elements=st.floats(-2.0**100, 2.0**100, width=32, allow_subnormal=False)),
       st.integers(1, 64))
def test_the_streaming_norm_equals_numpy_in_any_chunking(values: np.ndarray, chunk: int) -> None:
    norm = StreamingL2Norm()
    for i in range(0, values.size, chunk):
        norm.add(values[i:i + chunk])
    expected = float(np.linalg.norm(values.astype(np.float64)))
    assert math.isclose(norm.norm, expected, rel_tol=1e-9, abs_tol=1e-30)


def test_the_norm_of_float32_extremes_is_finite_and_of_bad_values_is_not() -> None:
    norm = StreamingL2Norm()
    norm.add(np.full(1000, 3e38, np.float32))
    assert math.isfinite(norm.norm) and norm.norm > 9e39
    for bad in (np.nan, np.inf, -np.inf):
        norm = StreamingL2Norm()
        norm.add(np.array([1.0, bad], np.float32))
        assert not math.isfinite(norm.norm)


def test_a_model_with_a_non_finite_or_absurd_parameter_is_named() -> None:
    ok = {"w": np.ones((2, 2), np.float32), "b": np.zeros(0, np.float32)}
    assert model_problem(ok, max_abs_parameter=1e6) is None
    nan = {"w": np.array([1.0, np.nan], np.float32)}
    assert "'w'" in (model_problem(nan, max_abs_parameter=1e6) or "")
    huge = {"w": np.ones(2, np.float32), "v": np.array([-3e38], np.float32)}
    problem = model_problem(huge, max_abs_parameter=1e6)
    assert problem is not None and "'v'" in problem and "max_abs_parameter (1e+06)" in problem
