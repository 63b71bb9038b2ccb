"""Spooled uploads: size and hash are checked against the header, and a checked update is
folded into the aggregate chunk by chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.rounds.errors import InvalidRequest, TooLarge
from coordinator.rounds.uploads import SpooledUpload, accumulate, all_finite
from core.aggregation.fedavg import StreamingWeightedMean


def spool(tmp_path: Path, data: bytes, *, declared: int | None = None, sha: str | None = None,
          chunk: int = 7, max_chunk: int = 64) -> SpooledUpload:
    up = SpooledUpload(tmp_path / "u.bin", declared_bytes=len(data) if declared is None else
                       declared, sha256=hashlib.sha256(data).hexdigest() if sha is None else sha,
                       max_chunk_bytes=max_chunk)
    for i in range(0, len(data), chunk):
        up.write(data[i:i + chunk])
    return up


def test_a_complete_upload_is_accepted(tmp_path: Path) -> None:
    data = np.arange(10, dtype="<f4").tobytes()
    path = spool(tmp_path, data).finish()
    assert path.read_bytes() == data


def test_more_bytes_than_declared_stop_at_the_first_excess_chunk(tmp_path: Path) -> None:
    with pytest.raises(TooLarge, match="more than its declared 8 bytes"):
        spool(tmp_path, bytes(100), declared=8)


def test_fewer_bytes_than_declared_are_refused(tmp_path: Path) -> None:
    up = spool(tmp_path, bytes(8), declared=12)
    with pytest.raises(InvalidRequest, match="ended after 8 bytes"):
        up.finish()


def test_a_hash_mismatch_is_refused(tmp_path: Path) -> None:
    up = spool(tmp_path, bytes(8), sha="ab" * 32)
    with pytest.raises(InvalidRequest, match="sha256"):
        up.finish()


def test_a_chunk_over_the_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="maximum chunk size"):
        spool(tmp_path, bytes(100), chunk=100, max_chunk=64)


def test_discard_removes_the_spool_file(tmp_path: Path) -> None:
    up = spool(tmp_path, bytes(8))
    up.discard()
    assert not (tmp_path / "u.bin").exists()


def test_non_finite_values_are_found_in_any_chunk(tmp_path: Path) -> None:
    values = np.zeros(3000, dtype="<f4")
    assert all_finite(spool(tmp_path, values.tobytes(), chunk=1000, max_chunk=4096).finish())
    values[2999] = np.inf
    path = tmp_path / "bad.bin"
    path.write_bytes(values.tobytes())
    assert not all_finite(path)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 100), st.floats(-10, 10)), min_size=1, max_size=5),
       st.integers(1, 50))
def test_accumulating_spooled_updates_equals_numpy_weighted_mean(
    tmp_path_factory: pytest.TempPathFactory, updates: list[tuple[int, float]], size: int
) -> None:
    tmp = tmp_path_factory.mktemp("acc")
    acc = StreamingWeightedMean(size)
    arrays = []
    for i, (weight, value) in enumerate(updates):
        arr = np.linspace(value, -value, size, dtype=np.float32)
        arrays.append(arr)
        path = tmp / f"{i}.bin"
        path.write_bytes(arr.astype("<f4").tobytes())
        accumulate(path, acc, float(weight))
    expected = np.average(np.stack(arrays), axis=0, weights=[w for w, _ in updates])
    np.testing.assert_allclose(acc.mean(), expected, rtol=1e-5, atol=1e-5)
