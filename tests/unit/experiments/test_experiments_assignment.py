"""Arm assignment: sticky, unbiased, respects the split, independent across experiments.

The hash is deterministic, so every statistical check below is a fixed computation on fixed
ids: it passes or fails the same way every run. The thresholds (p > 1e-4, 5 sigma) are what a
correct PRF-based assignment passes for all but a 1e-4 fraction of id sets, while a biased
one (modulo bias, a weak hash of sequential ids, a split applied off by one) fails them by
orders of magnitude at n = 100,000.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from core.experiments.assignment import (
    StratifiedSplit,
    TrafficSplit,
    assign_arm,
    assign_arms,
    assignment_unit,
    assignment_units,
    new_salt,
)

N = 100_000
IDS = [f"device-{i:06d}" for i in range(N)]  # sequential ids: the worst case for a weak hash
SALT = "exp-2026-12-ranker-v2"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def units() -> np.ndarray:
    return assignment_units(IDS, SALT)


def test_unit_is_the_top_53_bits_of_hmac_sha256_of_the_id_keyed_by_the_salt() -> None:
    # An independent restatement of the construction, plus one pinned value: changing either
    # would silently reshuffle every running experiment.
    digest = hmac.new(
        SALT.encode(), b"fedcoord/experiment-assignment/v1\x00device-000042", hashlib.sha256
    ).digest()
    expected = (int.from_bytes(digest[:8], "big") >> 11) / 2**53
    assert assignment_unit("device-000042", SALT) == expected
    assert assignment_unit("device-000042", b"k") == pytest.approx(0.932508777472663, abs=0)


def test_assignment_is_sticky_across_calls_and_batch_and_single_agree(units: np.ndarray) -> None:
    split = TrafficSplit([0.5, 0.5])
    first = [assign_arm(d, salt=SALT, split=split) for d in IDS[:500]]
    again = [assign_arm(d, salt=SALT, split=split) for d in IDS[:500]]
    assert first == again
    assert list(assign_arms(IDS[:500], salt=SALT, split=split)) == first
    assert units[:500].tolist() == [assignment_unit(d, SALT) for d in IDS[:500]]


def test_assignment_is_sticky_across_processes(units: np.ndarray) -> None:
    # Another interpreter with another hash seed (str hashing must play no part).
    code = (
        "from core.experiments.assignment import assignment_units;"
        f"print(repr(assignment_units([f'device-{{i:06d}}' for i in range(200)], {SALT!r}).tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert eval(out) == units[:200].tolist()  # noqa: S307 - our own subprocess's repr of floats


def test_units_are_uniform_on_sequential_ids(units: np.ndarray) -> None:
    assert units.min() >= 0.0 and units.max() < 1.0
    assert stats.kstest(units, "uniform").pvalue > 1e-4


def test_two_equal_arms_are_balanced_within_binomial_bounds(units: np.ndarray) -> None:
    arms = TrafficSplit([0.5, 0.5]).arms_of(units)
    n_treatment = int(arms.sum())
    sigma = math.sqrt(N * 0.25)
    assert abs(n_treatment - N / 2) < 5 * sigma  # 5 sigma = 790 devices of 100,000
    assert stats.binomtest(n_treatment, N, 0.5).pvalue > 1e-4


def test_an_uneven_split_is_respected(units: np.ndarray) -> None:
    weights = [0.1, 0.25, 0.65]
    counts = np.bincount(TrafficSplit(weights).arms_of(units), minlength=3)
    expected = np.asarray(weights) * N
    sigma = np.sqrt(N * np.asarray(weights) * (1 - np.asarray(weights)))
    assert np.all(np.abs(counts - expected) < 5 * sigma)
    assert stats.chisquare(counts, expected).pvalue > 1e-4


def test_each_arm_owns_its_slice_of_the_unit_interval() -> None:
    split = TrafficSplit([0.2, 0.0, 0.8])
    assert split.arm_of(0.0) == 0
    assert split.arm_of(np.nextafter(0.2, 0.0)) == 0
    assert split.arm_of(0.2) == 2  # the zero-weight arm gets nobody, not even its boundary
    assert split.arm_of(1.0 - 2.0**-53) == 2
    assert TrafficSplit([0.5, 0.5, 0.0]).arm_of(1.0 - 2.0**-53) == 1


def test_different_salts_give_independent_assignments(units: np.ndarray) -> None:
    split = TrafficSplit([0.5, 0.5])
    a = split.arms_of(units)
    b = split.arms_of(assignment_units(IDS, "exp-2026-12-other"))
    table = np.histogram2d(a, b, bins=2)[0]
    assert stats.chi2_contingency(table).pvalue > 1e-4
    agree = float(np.mean(a == b))  # 0.5 if independent; 1.0 would mean a reused assignment
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / N)


def test_new_salts_are_fresh_and_long() -> None:
    salts = {new_salt() for _ in range(100)}
    assert len(salts) == 100
    assert all(len(s) == 32 for s in salts)


def test_the_stratum_picks_the_split_but_never_enters_the_hash(units: np.ndarray) -> None:
    split = StratifiedSplit(
        TrafficSplit([0.5, 0.5]),
        {"low_end": TrafficSplit([0.9, 0.1]), "excluded": TrafficSplit([1.0, 0.0])},
    )
    ids = IDS[:20_000]
    low = assign_arms(ids, salt=SALT, split=split, strata=["low_end"] * len(ids))
    assert abs(low.mean() - 0.1) < 5 * math.sqrt(0.09 / len(ids))
    assert not assign_arms(ids, salt=SALT, split=split, strata=["excluded"] * len(ids)).any()
    # A stratum without its own split, or no stratum, uses the default on the same u.
    default = TrafficSplit([0.5, 0.5]).arms_of(units[: len(ids)])
    assert np.array_equal(
        assign_arms(ids, salt=SALT, split=split, strata=["tablet"] * len(ids)), default
    )
    assert np.array_equal(assign_arms(ids, salt=SALT, split=split), default)
    # Treatment under 10% implies treatment under 50% for the same device: moving from the
    # low-end stratum to the default never moves a treated device back to control.
    assert np.all(default[low == 1] == 1)
    mixed = ["low_end" if i % 2 else None for i in range(len(ids))]
    got = assign_arms(ids, salt=SALT, split=split, strata=mixed)
    assert [
        assign_arm(d, salt=SALT, split=split, stratum=s)
        for d, s in zip(ids[:300], mixed[:300], strict=True)
    ] == list(got[:300])


@pytest.mark.parametrize(
    "weights",
    [[1.0], [0.5, 0.6], [0.7, 0.2], [-0.1, 1.1], [float("nan"), 1.0], [0.0, 0.0]],
)
def test_a_split_must_be_a_distribution_over_two_or_more_arms(weights: list[float]) -> None:
    with pytest.raises(ValueError):
        TrafficSplit(weights)


def test_empty_salt_or_device_id_is_refused() -> None:
    with pytest.raises(ValueError, match="salt"):
        assignment_unit("device-1", "")
    with pytest.raises(ValueError, match="device id"):
        assignment_unit("", SALT)
    with pytest.raises(ValueError, match="stratum 'x' splits 3 arms"):
        StratifiedSplit(TrafficSplit([0.5, 0.5]), {"x": TrafficSplit([0.2, 0.3, 0.5])})
