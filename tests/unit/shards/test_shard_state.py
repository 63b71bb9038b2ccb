"""ShardState, the rounds of one aggregator shard: what it takes, what it refuses and why,
and the partial sum it hands back (no network; time from a manual clock)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregator_shard import RETAIN_S, ShardState
from coordinator.rounds.aggregators import MetricMeans
from coordinator.rounds.clock import ManualClock
from coordinator.rounds.errors import (
    Duplicate,
    InvalidRequest,
    Late,
    NotFound,
    NotSelected,
    Unavailable,
)
from coordinator.security.errors import Unauthenticated
from core.privacy.central import ClippedSum
from core.protocol import UNCLIPPED_METRIC, Participation, UpdateHeader
from core.shards import RoundKey, ShardMode, SignedTicket, UploadTicket, sign_ticket, tensors_digest
from core.tensors import TensorInfo

KEY = bytes(range(32))
VALUES = 6
NOW = 1_700_000_000.0
KEY_OF_ROUND = RoundKey("task-a", 11)


def ticket(device: str = "dev-1", **changes: object) -> UploadTicket:
    base = UploadTicket(
        task_id="task-a", round_id=11, round_number=3, device_id=device, shard=0,
        values=VALUES, mode=ShardMode.FEDAVG, weight_cap=100, clip_norm=0.0,
        max_update_l2_norm=math.inf, clear_metrics=True, adaptive_clipping=False,
        deadline=NOW + 60, max_chunk_bytes=1 << 20, max_num_examples=10_000,
        tensors=tensors_digest([]))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def header(update: np.ndarray, t: UploadTicket, *, signed: SignedTicket | None = None,
           num_examples: int = 10, metrics: dict[str, float] | None = None,
           upload_id: str = "", device: str | None = None, sha256: str | None = None,
           tensors: list[TensorInfo] | None = None) -> UpdateHeader:
    data = update.astype("<f4").tobytes()
    return UpdateHeader(
        participation=Participation(device or t.device_id, t.task_id, t.round_number, "tok"),
        num_examples=num_examples, tensors=tensors or [], total_bytes=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(), metrics=metrics or {},
        upload_id=upload_id, ticket=signed if signed is not None else sign_ticket(t, KEY))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def shard(tmp_path: Path, clock: ManualClock) -> ShardState:
    return ShardState(index=0, key=KEY, spool_dir=tmp_path, clock=clock)


def upload(shard: ShardState, update: np.ndarray, t: UploadTicket | None = None,
           **kwargs: object) -> str:
    """Streams ``update`` in two chunks (cut inside a value) and finishes it."""
    t = t or ticket()
    h = header(update, t, **kwargs)  # type: ignore[arg-type]
    u = shard.begin_upload(h)
    try:
        if u.takes_data:
            data = update.astype("<f4").tobytes()
            u.write(data[:5])
            u.write(data[5:])
        return shard.finish_upload(u)
    finally:
        shard.abort_upload(u)


def vec(*values: float) -> np.ndarray:
    out = np.zeros(VALUES, dtype=np.float32)
    out[:len(values)] = values
    return out


# ------------------------------------------------------------------ tickets


def test_an_upload_without_a_ticket_is_unauthenticated(shard: ShardState) -> None:
    h = dataclasses.replace(header(vec(1), ticket()), ticket=None)
    with pytest.raises(Unauthenticated, match="carries the upload ticket of its plan"):
        shard.begin_upload(h)


def test_a_ticket_signed_with_another_key_is_unauthenticated(shard: ShardState) -> None:
    forged = sign_ticket(ticket(), bytes(32))
    with pytest.raises(Unauthenticated, match="signature does not verify"):
        shard.begin_upload(header(vec(1), ticket(), signed=forged))


def test_an_altered_ticket_is_unauthenticated(shard: ShardState) -> None:
    genuine = sign_ticket(ticket(), KEY)
    raised = genuine.body.replace(b'"weight_cap":100', b'"weight_cap":999')
    assert raised != genuine.body
    with pytest.raises(Unauthenticated, match="was altered"):
        shard.begin_upload(header(vec(1), ticket(), signed=SignedTicket(raised, genuine.mac)))


def test_a_ticket_for_another_shard_is_refused_naming_both(shard: ShardState) -> None:
    t = ticket(shard=2)
    with pytest.raises(NotSelected, match="for aggregator shard 2; this is shard 0"):
        shard.begin_upload(header(vec(1), t))


def test_a_ticket_of_another_device_is_refused(shard: ShardState) -> None:
    with pytest.raises(NotSelected, match="issued to device 'dev-1', not to 'dev-2'"):
        shard.begin_upload(header(vec(1), ticket(), device="dev-2"))


def test_a_ticket_for_another_round_is_refused(shard: ShardState) -> None:
    t = ticket()
    h = header(vec(1), t)
    h = dataclasses.replace(h, participation=dataclasses.replace(h.participation,
                                                                 round_number=4))
    with pytest.raises(NotSelected, match="for round 3 of task 'task-a', not round 4"):
        shard.begin_upload(h)


def test_an_expired_ticket_is_late(shard: ShardState, clock: ManualClock) -> None:
    clock.advance(61)
    with pytest.raises(Late, match="until its deadline, 1.0 s ago"):
        shard.begin_upload(header(vec(1), ticket()))


# ------------------------------------------------------------------ headers


@pytest.mark.parametrize(("change", "message"), [
    (dict(num_examples=0), "num_examples must be between 1 and 10000, got 0"),
    (dict(num_examples=10_001), "num_examples must be between 1 and 10000"),
    (dict(sha256="abc"), "sha256 must be the 64 hex digits"),
    (dict(metrics={"bad name!": 1.0}), "metric name 'bad name!' is not a valid name"),
    (dict(metrics={"loss": math.nan}), "metric 'loss' is not finite"),
    (dict(metrics={UNCLIPPED_METRIC: 1.0}), "only sent under adaptive clipping"),
    (dict(upload_id="short"), "upload_id must be 16-64 characters"),
])
def test_a_header_that_does_not_fit_its_ticket_is_invalid(
        shard: ShardState, change: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        shard.begin_upload(header(vec(1), ticket(), **change))  # type: ignore[arg-type]


def test_the_declared_size_must_be_the_tickets_values(shard: ShardState) -> None:
    with pytest.raises(InvalidRequest, match="declares 20 bytes but this round's update is 6 "
                                             "float32 values"):
        shard.begin_upload(header(np.zeros(5, np.float32), ticket()))


def test_the_header_must_list_the_plans_tensors_in_order(shard: ShardState) -> None:
    weight, bias = TensorInfo("w", "float32", (2, 2)), TensorInfo("b", "float32", (2,))
    t = ticket(tensors=tensors_digest([weight, bias]))
    swapped = dataclasses.replace(header(vec(1), t), tensors=[bias, weight])
    with pytest.raises(InvalidRequest, match="not this round's update layout"):
        shard.begin_upload(swapped)
    assert upload(shard, vec(1), t, tensors=[weight, bias]) == "update accepted"


def test_without_clear_metrics_only_the_adaptive_bit_may_come(shard: ShardState) -> None:
    dp = ticket(mode=ShardMode.CLIPPED_SUM, clip_norm=1.0, clear_metrics=False,
                adaptive_clipping=True, weight_cap=1)
    with pytest.raises(InvalidRequest, match="withholds per-device metrics.*'loss'"):
        shard.begin_upload(header(vec(1), dp, metrics={"loss": 0.5, UNCLIPPED_METRIC: 0.0}))
    with pytest.raises(InvalidRequest, match="must be 0 or 1 under adaptive clipping, got 0.5"):
        shard.begin_upload(header(vec(1), dp, metrics={UNCLIPPED_METRIC: 0.5}))
    fixed = dataclasses.replace(dp, adaptive_clipping=False, device_id="dev-2")
    with pytest.raises(InvalidRequest, match="only sent under adaptive clipping"):
        shard.begin_upload(header(vec(1), fixed, metrics={UNCLIPPED_METRIC: 1.0}))


def test_a_ticket_whose_terms_differ_from_the_rounds_is_refused(shard: ShardState) -> None:
    upload(shard, vec(1))
    with pytest.raises(InvalidRequest, match="weight_cap differ from the other tickets"):
        shard.begin_upload(header(vec(1), ticket("dev-2", weight_cap=5)))


# ------------------------------------------------------------------ the partial sums


def test_a_fedavg_partial_is_the_capped_weighted_sum_with_metric_sums(
        shard: ShardState) -> None:
    a, b, c = vec(1, 2, 3), vec(-1, 0.5, 0, 4), vec(0, 0, 0, 0, 2, 2)
    upload(shard, a, ticket("dev-a"), num_examples=10, metrics={"loss": 2.0, "eval_acc": 0.5,
                                                                "eval_examples": 40})
    upload(shard, b, ticket("dev-b"), num_examples=500, metrics={"loss": 1.0})  # capped: 100
    upload(shard, c, ticket("dev-c"), num_examples=30)

    part = shard.collect(KEY_OF_ROUND)

    expected = 10 * a.astype(np.float64) + 100 * b.astype(np.float64) + 30 * c
    np.testing.assert_allclose(part.total, expected, rtol=1e-12)
    assert part.mode is ShardMode.FEDAVG
    assert part.reported == ["dev-a", "dev-b", "dev-c"]
    assert part.weight == 140.0
    assert part.metric_sums == {"loss": 10 * 2.0 + 100 * 1.0, "eval_acc": 40 * 0.5}
    assert part.metric_weights == {"loss": 110.0, "eval_acc": 40.0}
    means = MetricMeans(100.0)
    means.add({"loss": 2.0, "eval_acc": 0.5, "eval_examples": 40}, 10.0)
    means.add({"loss": 1.0}, 100.0)
    assert (part.metric_sums, part.metric_weights) == (means.sums, means.weights)


def test_without_clear_metrics_a_fedavg_partial_keeps_none(shard: ShardState) -> None:
    upload(shard, vec(1), ticket(clear_metrics=False))
    part = shard.collect(KEY_OF_ROUND)
    assert part.metric_sums == {} and part.metric_weights == {}
    assert part.weight == 10.0


def test_a_clipped_sum_clips_each_update_weighs_it_1_and_counts_the_bits(
        shard: ShardState) -> None:
    terms = dict(mode=ShardMode.CLIPPED_SUM, clip_norm=1.0, clear_metrics=False,
                 adaptive_clipping=True, weight_cap=1)
    big, small = vec(3, 4), vec(0.3, 0.4)
    upload(shard, big, ticket("dev-a", **terms), num_examples=50,
           metrics={UNCLIPPED_METRIC: 1.0})
    upload(shard, small, ticket("dev-b", **terms), num_examples=7,
           metrics={UNCLIPPED_METRIC: 0.0})

    part = shard.collect(KEY_OF_ROUND)

    reference = ClippedSum(VALUES, l2_clip_norm=1.0)
    reference.add(big)
    reference.add(small)
    np.testing.assert_allclose(part.total, reference.total, rtol=1e-12)
    np.testing.assert_allclose(part.total[:2], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
    assert part.mode is ShardMode.CLIPPED_SUM
    assert (part.weight, part.count, part.unclipped) == (2.0, 2, 1.0)
    assert part.metric_sums == {}


def test_an_update_over_the_norm_bound_or_not_finite_is_refused_and_the_device_is_out(
        shard: ShardState) -> None:
    bounded = dict(max_update_l2_norm=2.0)
    with pytest.raises(InvalidRequest, match="L2 norm 5, over the task's bound of 2"):
        upload(shard, vec(3, 4), ticket("dev-a", **bounded))
    with pytest.raises(InvalidRequest, match="NaN or infinite"):
        upload(shard, vec(math.nan), ticket("dev-b", **bounded))
    with pytest.raises(Late, match="out of round 3: its update was refused"):
        upload(shard, vec(1), ticket("dev-a", **bounded))
    upload(shard, vec(1), ticket("dev-c", **bounded))
    part = shard.collect(KEY_OF_ROUND)
    assert part.reported == ["dev-c"]
    np.testing.assert_array_equal(part.total, 10 * vec(1))


def test_a_hash_mismatch_is_refused_and_the_device_may_send_again(shard: ShardState) -> None:
    with pytest.raises(InvalidRequest, match="does not match the header's"):
        upload(shard, vec(1), sha256="0" * 64)
    upload(shard, vec(1))
    assert shard.collect(KEY_OF_ROUND).reported == ["dev-1"]


# ------------------------------------------------------------------ duplicates and retries


def test_a_second_update_of_a_device_is_a_duplicate(shard: ShardState) -> None:
    upload(shard, vec(1))
    with pytest.raises(Duplicate, match="already reported for round 3"):
        upload(shard, vec(2))


def test_a_retried_upload_gets_the_first_answer_and_counts_once(shard: ShardState) -> None:
    assert upload(shard, vec(1), upload_id="u" * 20) == "update accepted"
    again = upload(shard, vec(1), upload_id="u" * 20)
    assert "a retry of an upload that was accepted; counted once" in again
    assert shard.collect(KEY_OF_ROUND).weight == 10.0


def test_a_retried_refused_upload_gets_the_same_refusal(shard: ShardState) -> None:
    t = ticket(max_update_l2_norm=1.0)
    with pytest.raises(InvalidRequest, match="over the task's bound"):
        upload(shard, vec(3), t, upload_id="r" * 20)
    with pytest.raises(InvalidRequest, match="over the task's bound"):
        upload(shard, vec(3), t, upload_id="r" * 20)


def test_an_upload_id_names_one_update(shard: ShardState) -> None:
    upload(shard, vec(1), upload_id="u" * 20)
    with pytest.raises(Duplicate, match="already answered for another update"):
        upload(shard, vec(2), upload_id="u" * 20)


def test_a_second_upload_while_one_is_open_is_a_duplicate_unless_it_retries_it(
        shard: ShardState) -> None:
    first = shard.begin_upload(header(vec(1), ticket(), upload_id="a" * 20))
    with pytest.raises(Duplicate, match="already has an upload in progress"):
        shard.begin_upload(header(vec(1), ticket(), upload_id="b" * 20))
    upload(shard, vec(1), upload_id="a" * 20)  # the client gave up on the first: it retries
    first.write(vec(1).tobytes())
    with pytest.raises(Late, match="a retry of this upload replaced it"):
        shard.finish_upload(first)
    assert shard.collect(KEY_OF_ROUND).reported == ["dev-1"]


# ------------------------------------------------------------------ collect, drop, expire


def test_collect_closes_the_round_and_is_repeatable(shard: ShardState) -> None:
    upload(shard, vec(1), ticket("dev-a"))
    first = shard.collect(KEY_OF_ROUND)
    with pytest.raises(Late, match="was collected: it takes no more uploads"):
        upload(shard, vec(2), ticket("dev-b"))
    again = shard.collect(KEY_OF_ROUND)
    assert again.reported == first.reported == ["dev-a"]
    np.testing.assert_array_equal(again.total, first.total)
    assert shard.progress([KEY_OF_ROUND])[0].collected


def test_an_upload_finishing_after_collect_is_late(shard: ShardState) -> None:
    upload(shard, vec(1), ticket("dev-a"))
    open_upload = shard.begin_upload(header(vec(2), ticket("dev-b")))
    open_upload.write(vec(2).tobytes())
    part = shard.collect(KEY_OF_ROUND)
    with pytest.raises(Late, match="collected or dropped while the update was sent"):
        shard.finish_upload(open_upload)
    assert part.reported == ["dev-a"]
    assert not any(Path(open_upload.spool.path).parent.iterdir())  # type: ignore[union-attr]


def test_collect_waits_for_a_fold_in_flight(shard: ShardState, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    from coordinator.aggregator_shard import accumulator

    folding, release = threading.Event(), threading.Event()
    real = accumulator.iter_float32

    def slow(path: Path):  # type: ignore[no-untyped-def]
        folding.set()
        release.wait(10)
        yield from real(path)

    monkeypatch.setattr(accumulator, "iter_float32", slow)
    worker = threading.Thread(target=upload, args=(shard, vec(5)))
    worker.start()
    assert folding.wait(10)
    collected: list[object] = []
    collector = threading.Thread(target=lambda: collected.append(shard.collect(KEY_OF_ROUND)))
    collector.start()
    collector.join(0.2)
    assert collector.is_alive(), "collect returned while an accepted update was being added"
    release.set()
    worker.join(10)
    collector.join(10)
    (part,) = collected
    assert part.reported == ["dev-1"]  # type: ignore[attr-defined]


def test_a_fold_that_fails_part_way_loses_the_round_rather_than_a_wrong_sum(
        shard: ShardState, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.aggregator_shard import accumulator

    def failing(path: Path):  # type: ignore[no-untyped-def]
        yield 0, np.ones(2, dtype=np.float32)
        raise OSError("disk gone")

    upload(shard, vec(1), ticket("dev-a"))
    monkeypatch.setattr(accumulator, "iter_float32", failing)
    with pytest.raises(OSError):
        upload(shard, vec(1), ticket("dev-b"))
    with pytest.raises(Unavailable, match="adding device 'dev-b'.*update failed"):
        shard.collect(KEY_OF_ROUND)


def test_collecting_a_round_without_uploads_is_not_found_and_closes_it(
        shard: ShardState) -> None:
    with pytest.raises(NotFound, match="took no upload for round 11 of task 'task-a'"):
        shard.collect(KEY_OF_ROUND)
    with pytest.raises(Late, match="was collected"):
        upload(shard, vec(1))


def test_progress_names_the_reported_devices_of_the_known_rounds(shard: ShardState) -> None:
    upload(shard, vec(1), ticket("dev-a"))
    upload(shard, vec(1), ticket("dev-b"))
    other = RoundKey("task-a", 12)
    (progress,) = shard.progress([KEY_OF_ROUND, other])
    assert (progress.key, progress.reported, progress.collected) == (
        KEY_OF_ROUND, ["dev-a", "dev-b"], False)


def test_drop_forgets_the_round_and_refuses_its_late_uploads(shard: ShardState) -> None:
    upload(shard, vec(1), ticket("dev-a"))
    shard.drop(KEY_OF_ROUND)
    assert shard.progress([KEY_OF_ROUND]) == []
    with pytest.raises(NotFound):
        shard.collect(KEY_OF_ROUND)
    with pytest.raises(Late):
        upload(shard, vec(1), ticket("dev-b"))
    shard.drop(RoundKey("never", 1))  # dropping an unknown round is no error


def test_expire_forgets_rounds_retain_s_after_their_latest_deadline(
        shard: ShardState, clock: ManualClock) -> None:
    upload(shard, vec(1), ticket("dev-a"))
    upload(shard, vec(1), ticket("dev-b", deadline=NOW + 120))
    assert shard.expire(NOW + 120 + RETAIN_S) == []
    assert shard.expire(NOW + 121 + RETAIN_S) == [KEY_OF_ROUND]
    assert shard.rounds() == []


def test_an_upload_abandoned_before_it_finished_does_not_count(shard: ShardState) -> None:
    u = shard.begin_upload(header(vec(1), ticket()))
    u.write(vec(1).tobytes())
    shard.abort_upload(u)  # the call was cancelled
    with pytest.raises(Late, match="abandoned"):
        shard.finish_upload(u)
    upload(shard, vec(1))  # the device may send it again
    assert shard.collect(KEY_OF_ROUND).reported == ["dev-1"]


def test_an_abort_while_the_update_is_added_leaves_its_file_to_the_fold(
        shard: ShardState, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.aggregator_shard import accumulator

    real = accumulator.iter_float32
    u = shard.begin_upload(header(vec(7), ticket()))
    u.write(vec(7).tobytes())

    def cancelled_meanwhile(path: Path):  # type: ignore[no-untyped-def]
        shard.abort_upload(u)
        yield from real(path)

    monkeypatch.setattr(accumulator, "iter_float32", cancelled_meanwhile)
    assert shard.finish_upload(u) == "update accepted"
    np.testing.assert_array_equal(shard.collect(KEY_OF_ROUND).total, 10 * vec(7))
    assert u.spool is not None and not u.spool.path.exists()
