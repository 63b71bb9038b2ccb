"""Secure-aggregation primitives: Shamir sharing, key agreement and encryption, PRG masks,
quantization. Property-based where the claim is "for all"."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.secagg import keys, masks, shamir
from core.secagg.quantize import Quantizer


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=1, max_size=32).map(lambda b: b + b[: len(b) % 2]),
       st.integers(2, 7).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_every_threshold_subset_reconstructs_and_fewer_do_not(
    secret: bytes, nt: tuple[int, int]
) -> None:
    n, t = nt
    shares = shamir.split(secret, threshold=t, share_ids=range(1, n + 1))
    for subset in itertools.combinations(shares, t):
        assert shamir.combine({i: shares[i] for i in subset}, threshold=t) == secret
    if t > 1:
        with pytest.raises(shamir.ShamirError, match="cannot reconstruct"):
            shamir.combine({i: shares[i] for i in list(shares)[: t - 1]}, threshold=t)


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.integers(0, 7), st.integers(1, 2**31 - 2))
def test_a_tampered_share_is_detected_when_more_than_t_are_given(
    secret: bytes, chunk: int, delta: int
) -> None:
    shares = shamir.split(secret, threshold=3, share_ids=[1, 2, 3, 4, 5])
    values = np.frombuffer(shares[4], dtype="<u4").astype(np.int64)
    values[chunk] = (values[chunk] + delta) % shamir.PRIME
    shares[4] = values.astype("<u4").tobytes()
    with pytest.raises(shamir.ShamirError, match="inconsistent"):
        shamir.combine(shares, threshold=3)


def test_t_minus_one_shares_with_a_guess_do_not_give_the_secret() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, share_ids=[1, 2, 3])
    forged = {1: shares[1], 2: shares[2], 3: bytes(len(shares[3]))}
    try:
        assert shamir.combine(forged, threshold=3) != secret
    except shamir.ShamirError:
        pass


def test_key_agreement_is_symmetric_and_bound_to_its_context() -> None:
    a, a_pub = keys.generate_keypair()
    b, b_pub = keys.generate_keypair()
    k1 = keys.agree(a, b_pub, context=b"task/1/round/2")
    assert k1 == keys.agree(b, a_pub, context=b"task/1/round/2")
    assert k1 != keys.agree(a, b_pub, context=b"task/1/round/3")
    with pytest.raises(keys.CryptoError, match="32 bytes"):
        keys.agree(a, b_pub[:31], context=b"x")


def test_tampered_ciphertexts_and_wrong_associated_data_are_refused() -> None:
    key = bytes(32)
    box = keys.encrypt(key, b"share", associated=b"from 1 to 2")
    assert keys.decrypt(key, box, associated=b"from 1 to 2") == b"share"
    flipped = box[:-1] + bytes([box[-1] ^ 1])
    for bad, ad in ((flipped, b"from 1 to 2"), (box, b"from 3 to 2")):
        with pytest.raises(keys.CryptoError, match="authentication"):
            keys.decrypt(key, bad, associated=ad)


def test_masks_are_deterministic_in_the_seed_and_pairwise_masks_cancel() -> None:
    seed = bytes(range(32))
    m = masks.expand_mask(seed, 1000, bits=20)
    assert np.array_equal(m, masks.expand_mask(seed, 1000, bits=20))
    assert m.max() < 2**20
    x = np.arange(1000, dtype=np.uint64)
    y = np.arange(1000, dtype=np.uint64) * 3
    masked_x = masks.add_mod(x, m, 20)
    masked_y = masks.sub_mod(y, m, 20)
    assert np.array_equal(masks.add_mod(masked_x, masked_y, 20), (x + y) & np.uint64(2**20 - 1))


def test_a_mask_looks_uniform() -> None:
    m = masks.expand_mask(b"k" * 32, 200_000, bits=8)
    counts = np.bincount(m.astype(np.int64), minlength=256)
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 400  # 255 degrees of freedom; p < 1e-7 beyond about 400


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.integers(2, 24), st.floats(0.01, 10.0))
def test_the_sum_of_n_quantized_vectors_never_wraps_and_stays_within_the_error_bound(
    n: int, bits: int, clip: float
) -> None:
    q = Quantizer(clip=clip, value_bits=bits, num_devices=n)
    rng = np.random.default_rng(n * 1000 + bits)
    xs = rng.uniform(-clip, clip, size=(n, 16))
    total = np.zeros(16, dtype=np.uint64)
    for x in xs:
        qx, clipped = q.quantize(x, rng)
        assert clipped == 0
        total = masks.add_mod(total, qx, q.modulus_bits)
    assert (n * (2**bits - 1)) < 2**q.modulus_bits
    err = np.abs(q.dequantize_sum(total, n) - xs.sum(axis=0))
    assert (err <= n * q.step + 1e-9).all()


def test_values_outside_the_range_are_counted_not_hidden() -> None:
    q = Quantizer(clip=1.0, value_bits=8, num_devices=4)
    _, clipped = q.quantize(np.array([0.5, 2.0, -3.0, 1.0]), np.random.default_rng(0))
    assert clipped == 2


def test_settings_that_would_overflow_are_refused() -> None:
    with pytest.raises(Exception, match="at most 62"):
        Quantizer(clip=1.0, value_bits=40, num_devices=2**30)
