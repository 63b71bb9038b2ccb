"""core.shards: upload tickets only the coordinator's key can issue, partial sums that add up
exactly, and shard keys read from their files."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from core.shards import (
    KEY_BYTES,
    PartialSum,
    RoundKey,
    ShardMode,
    SignedTicket,
    TicketError,
    UploadTicket,
    admin_token,
    check_admin_token,
    combine,
    derive_shard_key,
    parse_key,
    sign_ticket,
    tensors_digest,
    verify_ticket,
)

KEY = bytes(range(KEY_BYTES))


def ticket(**kw: object) -> UploadTicket:
    base: dict[str, object] = dict(
        task_id="t1", round_id=7, round_number=3, device_id="dev-1", shard=1, values=10,
        mode=ShardMode.FEDAVG, weight_cap=100, clip_norm=0.0, max_update_l2_norm=math.inf,
        clear_metrics=True, adaptive_clipping=False, deadline=1_700_000_100.0,
        max_chunk_bytes=1 << 20, max_num_examples=1 << 31, tensors=tensors_digest([]))
    base.update(kw)
    return UploadTicket(**base)  # type: ignore[arg-type]


def test_a_signed_ticket_verifies_to_the_same_ticket() -> None:
    t = ticket(mode=ShardMode.CLIPPED_SUM, clip_norm=0.5, adaptive_clipping=True)
    assert verify_ticket(sign_ticket(t, KEY), KEY) == t
    assert t.round_key == RoundKey("t1", 7)


def test_an_unbounded_norm_survives_the_round_trip() -> None:
    assert verify_ticket(sign_ticket(ticket(), KEY), KEY).max_update_l2_norm == math.inf


@pytest.mark.parametrize("tamper", [
    lambda s: SignedTicket(s.body.replace(b'"dev-1"', b'"dev-2"'), s.mac),
    lambda s: SignedTicket(s.body.replace(b'"shard":1', b'"shard":0'), s.mac),
    lambda s: SignedTicket(s.body, bytes(32)),
    lambda s: SignedTicket(s.body, s.mac[:-1]),
])
def test_an_altered_ticket_is_refused(tamper: object) -> None:
    signed = sign_ticket(ticket(), KEY)
    with pytest.raises(TicketError, match="signature does not verify"):
        verify_ticket(tamper(signed), KEY)  # type: ignore[operator]


def test_a_ticket_signed_with_another_key_is_refused() -> None:
    with pytest.raises(TicketError, match="not issued by this shard's coordinator"):
        verify_ticket(sign_ticket(ticket(), b"x" * KEY_BYTES), KEY)


def test_a_validly_signed_body_that_is_not_a_ticket_is_refused() -> None:
    import hashlib
    import hmac
    body = b'{"task_id":"t1"}'
    mac = hmac.new(KEY, b"fedcoord/v1/upload-ticket\x00" + body, hashlib.sha256).digest()
    with pytest.raises(TicketError, match="fields are not a ticket's"):
        verify_ticket(SignedTicket(body, mac), KEY)


def test_the_admin_token_depends_on_the_key() -> None:
    assert check_admin_token(KEY, admin_token(KEY))
    assert not check_admin_token(KEY, admin_token(b"y" * KEY_BYTES))
    assert not check_admin_token(KEY, "")


def part(total: list[float], devices: list[str], weight: float, **kw: object) -> PartialSum:
    return PartialSum(ShardMode.FEDAVG, np.array(total, dtype=np.float64), devices,
                      weight=weight, **kw)  # type: ignore[arg-type]


def test_combined_partial_sums_are_the_sum_of_their_parts() -> None:
    a = part([1.0, 2.0], ["a1", "a2"], 3.0, metric_sums={"loss": 2.0},
             metric_weights={"loss": 3.0})
    b = part([0.5, -1.0], ["b1"], 1.0, metric_sums={"loss": 1.0, "acc": 0.5},
             metric_weights={"loss": 1.0, "acc": 1.0})
    total = combine([a, b], size=2, mode=ShardMode.FEDAVG)
    np.testing.assert_array_equal(total.total, [1.5, 1.0])
    assert total.reported == ["a1", "a2", "b1"] and total.count == 3
    assert total.weight == 4.0
    assert total.metric_sums == {"loss": 3.0, "acc": 0.5}
    assert total.metric_weights == {"loss": 4.0, "acc": 1.0}


def test_nothing_combined_is_an_empty_sum() -> None:
    total = combine([], size=3, mode=ShardMode.CLIPPED_SUM)
    assert total.count == 0 and total.total.tolist() == [0.0, 0.0, 0.0]


def test_a_device_in_two_partial_sums_is_refused() -> None:
    with pytest.raises(ValueError, match="device a1 is in two partial sums"):
        combine([part([1.0], ["a1"], 1.0), part([1.0], ["a1"], 1.0)], size=1,
                mode=ShardMode.FEDAVG)


def test_partial_sums_of_another_mode_or_size_are_refused() -> None:
    with pytest.raises(ValueError, match="mode fedavg in a clipped_sum round"):
        combine([part([1.0], ["a"], 1.0)], size=1, mode=ShardMode.CLIPPED_SUM)
    with pytest.raises(ValueError, match="2 values; the model has 1"):
        combine([part([1.0, 2.0], ["a"], 1.0)], size=1, mode=ShardMode.FEDAVG)


def test_a_key_file_holds_raw_bytes_or_hex() -> None:
    assert parse_key(KEY) == KEY
    assert parse_key(KEY.hex().encode() + b"\n") == KEY
    with pytest.raises(ValueError, match="this holds 5 bytes"):
        parse_key(b"short")
    with pytest.raises(ValueError, match="hex characters"):
        parse_key(b"z" * 64)


def test_a_ticket_field_set_is_fixed() -> None:
    # The MAC covers every field: a field added later must be added to verify's check too.
    assert {f.name for f in dataclasses.fields(UploadTicket)} == set(
        __import__("json").loads(ticket().encode()))


def test_each_shard_has_a_key_of_its_own_derived_from_the_master() -> None:
    keys = [derive_shard_key(KEY, i) for i in range(3)]
    assert len(set(keys)) == 3 and all(len(k) == KEY_BYTES for k in keys)
    assert derive_shard_key(KEY, 1) == keys[1]  # the coordinator derives what the shard holds
    assert derive_shard_key(b"m" * KEY_BYTES, 1) != keys[1]
    # Shard 0's key neither makes tickets shard 1 takes nor calls shard 1.
    with pytest.raises(TicketError):
        verify_ticket(sign_ticket(ticket(shard=1), keys[0]), keys[1])
    assert not check_admin_token(keys[1], admin_token(keys[0]))
    with pytest.raises(ValueError, match="a shard index is >= 0"):
        derive_shard_key(KEY, -1)
