"""Device keys and proofs, bearer secrets, token buckets and the replay cache: pure code,
no network."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from coordinator.security.replay import ReplayCache
from core.security.bearer import hash_secret, matches, new_secret, parse_secret
from core.security.identity import DeviceKey, DeviceProof, InvalidProof, device_id_for
from core.security.ratelimit import Rate, RateLimiter


def test_a_device_id_is_derived_from_the_public_key() -> None:
    key = DeviceKey.generate()
    assert key.device_id == device_id_for(key.public_key)
    assert key.device_id.startswith("dk-") and len(key.device_id) == 35
    assert DeviceKey.generate().device_id != key.device_id


def test_a_proof_verifies_for_its_purpose_id_and_task_only() -> None:
    key = DeviceKey.generate()
    proof = key.prove("check-in", "task-1")
    assert proof.verify("check-in", key.device_id, "task-1") == key.device_id
    assert proof.verify("check-in", "", "task-1") == key.device_id
    for purpose, device_id, task in (("enroll", key.device_id, "task-1"),
                                     ("check-in", key.device_id, "task-2")):
        with pytest.raises(InvalidProof, match="does not verify"):
            proof.verify(purpose, device_id, task)


def test_no_device_can_claim_another_devices_id() -> None:
    victim, attacker = DeviceKey.generate(), DeviceKey.generate()
    proof = attacker.prove("check-in")
    with pytest.raises(InvalidProof, match="not the one derived"):
        proof.verify("check-in", victim.device_id, "")
    # Nor by pairing the victim's public key with its own signature.
    forged = DeviceProof(victim.public_key, proof.timestamp_ms, proof.nonce, proof.signature)
    with pytest.raises(InvalidProof, match="does not verify"):
        forged.verify("check-in", victim.device_id, "")


@pytest.mark.parametrize("field,value,message", [
    ("public_key", b"x" * 31, "public key must be 32"),
    ("nonce", b"n" * 3, "nonce must be 16"),
    ("signature", b"s" * 10, "signature must be 64"),
])
def test_malformed_proofs_are_refused_with_a_reason(field: str, value: bytes,
                                                    message: str) -> None:
    proof = DeviceKey.generate().prove("enroll")
    bad = DeviceProof(**{**vars(proof), field: value})
    with pytest.raises(InvalidProof, match=message):
        bad.verify("enroll", "", "")


def test_a_device_key_file_is_created_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    key = DeviceKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert DeviceKey.load_or_create(path).device_id == key.device_id
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="owner only"):
        DeviceKey.load_or_create(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a device key"):
        DeviceKey.load_or_create(path)


def test_secrets_are_found_by_id_and_proved_by_hash() -> None:
    fresh = new_secret("fct")
    assert parse_secret(fresh.secret, "fct") == fresh.secret_id
    assert parse_secret(fresh.secret, "fce") is None
    assert parse_secret("fct_short", "fct") is None
    assert matches(fresh.secret, fresh.secret_hash)
    assert not matches(fresh.secret + "x", fresh.secret_hash)
    assert fresh.secret_hash == hash_secret(fresh.secret) and fresh.secret not in fresh.secret_hash


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(Rate(per_second=2.0, burst=3))
    assert [limiter.take("k", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k", 100.0) == pytest.approx(0.5)
    assert limiter.take("other", 100.0) == 0.0  # keys are independent
    assert limiter.take("k", 100.5) == 0.0
    assert limiter.take("k", 100.5) > 0


def test_a_token_bucket_remembers_a_bounded_number_of_keys() -> None:
    limiter = RateLimiter(Rate(per_second=1.0, burst=1), max_keys=100)
    for i in range(1000):
        limiter.take(f"k{i}", 0.0)
    assert len(limiter) == 100


def test_the_replay_cache_refuses_a_nonce_within_its_window_and_forgets_after() -> None:
    cache = ReplayCache(window_s=10.0)
    assert cache.first_use(b"n1", 0.0)
    assert not cache.first_use(b"n1", 9.0)
    assert cache.first_use(b"n2", 9.0)
    assert cache.first_use(b"n1", 10.5)  # the proof's timestamp check refuses it by then
    assert len(cache) == 2
