"""An upload is checked as it arrives: its L2 norm is summed chunk by chunk (a float32 value
may be cut between two chunks), so verifying it reads nothing back from the spool file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.uploads import SpooledUpload
from core.protocol import Participation, UpdateHeader


def received(tmp_path: Path, data: bytes, chunk: int) -> SpooledUpload:
    up = SpooledUpload(tmp_path / "u.bin", declared_bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), max_chunk_bytes=1 << 20)
    for i in range(0, len(data), chunk):
        up.write(data[i:i + chunk])
    up.finish()
    return up


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 4096, 1 << 20])
def test_the_norm_is_the_updates_whatever_the_chunking(tmp_path: Path, chunk: int) -> None:
    values = np.random.default_rng(chunk).normal(size=3001).astype("<f4")
    up = received(tmp_path, values.tobytes(), chunk)
    assert up.l2_norm == pytest.approx(float(np.linalg.norm(values.astype(np.float64))),
                                       rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_value_that_is_not_finite_makes_the_norm_not_finite(tmp_path: Path,
                                                               bad: float) -> None:
    values = np.ones(100, dtype="<f4")
    values[50] = bad
    assert not np.isfinite(received(tmp_path, values.tobytes(), 13).l2_norm)


def test_verifying_reads_nothing_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.rounds import uploads

    data = np.full(1000, 0.5, dtype="<f4").tobytes()
    up = SpooledUpload(tmp_path / "u.bin", declared_bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), max_chunk_bytes=1 << 20)
    header = UpdateHeader(Participation("d1", "t1", 1, "token"), 1, [], len(data),
                          hashlib.sha256(data).hexdigest(), {})
    upload = uploads.Upload(header, 1, up)
    upload.write(data)
    monkeypatch.setattr(uploads, "iter_float32", lambda *a, **k: pytest.fail("read back"))
    assert upload.verify() == pytest.approx(0.5 * 1000 ** 0.5)
