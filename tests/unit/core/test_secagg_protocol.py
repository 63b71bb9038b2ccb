"""SecAgg+ as a protocol, in one process: the server learns the exact sum of the survivors'
inputs whatever drops out, or aborts and releases nothing; devices refuse a deviating server."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scipy import stats

from core.secagg import encoding
from core.secagg.client import SecAggClient, SecAggRefused
from core.secagg.inprocess import run_round
from core.secagg.messages import (
    MaskedInputRequest,
    PeerKeys,
    ShareKeysRequest,
    ShareKeysResponse,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from core.secagg.params import Adversary, SecAggConfig, SecAggParamError, SecAggParams, derive
from core.secagg.server import SecAggAborted, SecAggRejected, SecAggServer
from core.types import SecAggProtocol

CTX = b"task-x/round/1/attempt/7"
STAGES = (Stage.ADVERTISE, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)


def params(n: int, k: int, t: int, ring_bits: int = 32) -> SecAggParams:
    return SecAggParams(num_devices=n, neighbours=k, threshold=t, value_bits=16,
                        ring_bits=ring_bits, clip=1.0, weight_cap=100,
                        security_failure=0.0, correctness_failure=0.0)


def inputs(n: int, length: int, seed: int, ring_bits: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    return {f"dev-{i}": rng.integers(0, 2**ring_bits, length, dtype=dtype) for i in range(n)}


def plain_sum(xs: dict[str, np.ndarray], who: tuple[str, ...]) -> np.ndarray:
    total = np.zeros_like(next(iter(xs.values())))
    for w in who:
        total += xs[w]
    return total


def drop_plan(names: list[str], counts: list[int], rng: random.Random) -> dict[Stage, set[str]]:
    pool = names[:]
    rng.shuffle(pool)
    plan: dict[Stage, set[str]] = {}
    for stage, c in zip(STAGES, counts, strict=True):
        plan[stage], pool = set(pool[:c]), pool[c:]
    return plan


# ---------------------------------------------------------------- exactness under dropouts


@st.composite
def rounds(draw: st.DrawFn) -> tuple[SecAggParams, int, list[int], int, int]:
    n = draw(st.integers(3, 200))
    # The complete graph for small n; sparse graphs (as SecAgg+ uses) keep large n quick.
    complete = n < 6 or (n <= 40 and draw(st.booleans()))
    k = n - 1 if complete else draw(st.integers(1, min(n - 2, 30) // 2)) * 2
    t = draw(st.integers(2, k + 1))
    fractions = draw(st.lists(st.floats(0, 0.3), min_size=4, max_size=4))
    counts = [math.floor(f * n) for f in fractions]  # 0-30% of the devices at each stage
    return (params(n, k, t, draw(st.sampled_from([32, 64]))), draw(st.integers(1, 40)), counts,
            draw(st.integers(0, 2**32)), draw(st.integers(0, 2**32)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds())
def test_the_unmasked_sum_is_exact_or_the_round_aborts(
    case: tuple[SecAggParams, int, list[int], int, int],
) -> None:
    p, length, counts, data_seed, drop_seed = case
    xs = inputs(p.num_devices, length, data_seed, p.ring_bits)
    drops = drop_plan(list(xs), counts, random.Random(drop_seed))
    dropped = sum(counts)
    try:
        out = run_round(p, xs, context=CTX, drops=drops, rng=random.Random(drop_seed)).result
    except SecAggAborted:
        # Only when drops can leave a neighbourhood with fewer than t live holders.
        assert dropped > p.neighbours - p.threshold
        event("aborted")
        return
    event("exact sum")
    gone_before_upload = drops[Stage.ADVERTISE] | drops[Stage.SHARE_KEYS] | drops[
        Stage.MASKED_INPUT]
    assert set(out.survivors).isdisjoint(gone_before_upload)
    assert drops[Stage.UNMASK] <= set(out.survivors)  # uploaded, then vanished: still summed
    assert np.array_equal(out.total, plain_sum(xs, out.survivors))


@pytest.mark.parametrize("seed", range(3))
def test_n100_t70_survives_30_dropouts_across_stages_and_aborts_at_31(seed: int) -> None:
    p = derive(SecAggConfig(neighbours=99, threshold=0.7, dropout=0.05), 100)
    assert (p.neighbours, p.threshold) == (99, 70)
    xs = inputs(100, 64, seed)
    rng = random.Random(seed)
    counts = [rng.randint(0, 10) for _ in range(3)]
    counts.append(30 - sum(counts))
    out = run_round(p, xs, context=CTX, drops=drop_plan(list(xs), counts, rng)).result
    assert len(out.survivors) + len(out.dropped) + counts[0] + counts[1] == 100
    assert np.array_equal(out.total, plain_sum(xs, out.survivors))

    counts[rng.randrange(4)] += 1
    with pytest.raises(SecAggAborted, match="70"):
        run_round(p, xs, context=CTX, drops=drop_plan(list(xs), counts, rng))


def test_an_abort_ends_the_round_before_any_share_is_asked_for_or_any_sum_released() -> None:
    p = params(5, 4, 4)
    xs = inputs(5, 8, 0)
    clients = {w: SecAggClient(p, CTX, b"h" * 32) for w in xs}
    server: SecAggServer[str] = SecAggServer(p, CTX)
    for w, c in clients.items():
        server.add_advertisement(w, c.advertise())
    for w, req in server.close_advertise().items():
        server.add_shares(w, clients[w].share_keys(req))
    masks = server.close_shares()
    for w in list(xs)[:3]:  # two of five vanish: 3 < t = 4
        server.add_masked_input(w, clients[w].mask(masks[w], xs[w]))
    with pytest.raises(SecAggAborted, match="threshold is 4"):
        server.close_masked_inputs()
    with pytest.raises(SecAggAborted, match="was aborted"):
        server.finish()
    assert server.pending() == set()


# ---------------------------------------------------------------- quantization and weights


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 50), st.integers(1, 200), st.floats(0.01, 10), st.integers(0, 2**32))
def test_dequantized_weighted_mean_is_within_the_documented_bound(
    n: int, length: int, clip: float, seed: int
) -> None:
    p = dataclasses.replace(params(n, n - 1, 2), clip=clip, weight_cap=500)
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-clip, clip, length) for _ in range(n)]
    examples = [int(e) for e in rng.integers(1, 2000, n)]
    encoded = [encoding.encode_update(u, e, p, rng) for u, e in zip(updates, examples, strict=True)]
    total = np.zeros(length + 1, dtype=np.uint32)
    for e in encoded:
        total += e.vector
    mean, weight = encoding.decode_mean(total, n, p)
    weights = [min(e, 500) for e in examples]
    assert weight == sum(weights)
    exact = sum(w * u for w, u in zip(weights, updates, strict=True)) / sum(weights)
    assert np.max(np.abs(mean - exact)) <= encoding.max_mean_error(n, weight, p) + 1e-9


def test_values_outside_the_clip_range_are_counted_not_hidden() -> None:
    p = derive(SecAggConfig(clip=0.5, dropout=0.01), 10)
    enc = encoding.encode_update(np.array([0.1, -0.7, 0.9, 0.5]), 1024, p,
                                 np.random.default_rng(0))
    assert enc.clipped == 2


def test_the_ring_leaves_room_for_n_times_the_range() -> None:
    for n in (3, 100, 1000, 50_000):
        p = derive(SecAggConfig(neighbours=2, threshold=0.0, adversary=Adversary.SEMI_HONEST,
                                corrupt_fraction=0.0, dropout=0.0), n)
        assert n * (2**p.value_bits - 1) < 2**p.ring_bits
        assert p.weight_cap <= 2**p.value_bits - 1


# ---------------------------------------------------------------- parameters


def test_derived_parameters_are_secure_and_correct_and_smaller_than_the_complete_graph() -> None:
    p = derive(SecAggConfig(), 200)
    assert p.neighbours < 199
    assert p.security_failure <= 2.0**-40 and p.correctness_failure <= 2.0**-20
    assert 2 * p.threshold > p.holders + math.floor(0.05 * 200)  # semi-malicious margin


def test_the_original_protocol_is_the_complete_graph() -> None:
    p = derive(SecAggConfig(protocol=SecAggProtocol.SECAGG, dropout=0.01), 30)
    assert p.neighbours == 29


@pytest.mark.parametrize(("config", "bound"), [
    (SecAggConfig(corrupt_fraction=0.3, dropout=0.31), r"a \+ 2d <= 0.9"),
    (SecAggConfig(adversary=Adversary.SEMI_HONEST, corrupt_fraction=0.5,
                  dropout=0.45), r"a \+ d <= 0.9"),
    (SecAggConfig(neighbours=99, threshold=0.5), r"2t > k \+ 1 \+ corrupt"),
    (SecAggConfig(neighbours=99, threshold=0.02, adversary=Adversary.SEMI_HONEST),
     "colluding"),
])
def test_settings_that_break_a_published_bound_are_refused_naming_it(
    config: SecAggConfig, bound: str
) -> None:
    with pytest.raises(SecAggParamError, match=bound):
        derive(config, 100)


def test_too_small_a_cohort_for_the_dropout_rate_is_refused_with_advice() -> None:
    with pytest.raises(SecAggParamError, match="lower the expected dropout"):
        derive(SecAggConfig(dropout=0.1), 10)


# ---------------------------------------------------------------- the device defends itself


class Rig:
    """Three honest devices and a fourth under test, driven stage by stage."""

    def __init__(self, n: int = 5) -> None:
        self.p = params(n, n - 1, 3)
        self.xs = inputs(n, 16, 1)
        self.clients = {w: SecAggClient(self.p, CTX, b"h" * 32) for w in self.xs}
        self.server: SecAggServer[str] = SecAggServer(self.p, CTX, random.Random(0))
        for w, c in self.clients.items():
            self.server.add_advertisement(w, c.advertise())
        self.share_requests = self.server.close_advertise()
        self.me = "dev-0"

    def shares(self) -> dict[str, MaskedInputRequest]:
        for w, req in self.share_requests.items():
            self.server.add_shares(w, self.clients[w].share_keys(req))
        return self.server.close_shares()

    def unmask_requests(self) -> dict[str, UnmaskRequest]:
        for w, req in self.shares().items():
            self.server.add_masked_input(w, self.clients[w].mask(req, self.xs[w]))
        return self.server.close_masked_inputs()


def _peer(p: PeerKeys, **changes: object) -> PeerKeys:
    return dataclasses.replace(p, **changes)  # type: ignore[arg-type]


SHARE_KEY_ATTACKS = {
    "listed twice": lambda r: ShareKeysRequest(r.index, r.peers + r.peers[:1]),
    "its own neighbour": lambda r: ShareKeysRequest(r.index, r.peers + (
        _peer(r.peers[0], index=r.index),)),
    "bytes, not 32": lambda r: ShareKeysRequest(r.index, (
        _peer(r.peers[0], mask_public=r.peers[0].mask_public[:31]),) + r.peers[1:]),
    "repeats another key": lambda r: ShareKeysRequest(r.index, (
        _peer(r.peers[0], mask_public=r.peers[1].mask_public),) + r.peers[1:]),
    "different model": lambda r: ShareKeysRequest(r.index, (
        _peer(r.peers[0], config_hash=b"x" * 32),) + r.peers[1:]),
    "cannot hold": lambda r: ShareKeysRequest(r.index, r.peers[:1]),
    "at most": lambda r: ShareKeysRequest(r.index, r.peers + (
        _peer(r.peers[0], index=99, encryption_public=bytes(range(32)),
              mask_public=bytes(range(1, 33))),)),
}


@pytest.mark.parametrize("attack", SHARE_KEY_ATTACKS)
def test_a_device_refuses_bad_neighbour_lists(attack: str) -> None:
    rig = Rig()
    request = SHARE_KEY_ATTACKS[attack](rig.share_requests[rig.me])
    with pytest.raises(SecAggRefused, match=attack):
        rig.clients[rig.me].share_keys(request)


def _others(r: UnmaskRequest, me: int) -> tuple[int, ...]:
    return tuple(v for v in r.survivors if v != me)


UNMASK_ATTACKS = {
    "both as survivors and as dropped": lambda r, me: UnmaskRequest(
        r.survivors, _others(r, me)[:1]),
    "listed twice": lambda r, me: UnmaskRequest(r.survivors + r.survivors[:1], r.dropped),
    "not listed as a survivor": lambda r, me: UnmaskRequest(_others(r, me), r.dropped),
    "alive but": lambda r, me: UnmaskRequest(_others(r, me), r.dropped + (me,)),
    "not neighbours that shared keys": lambda r, me: UnmaskRequest(r.survivors + (77,),
                                                                   r.dropped),
    "neither survivors nor dropped": lambda r, me: UnmaskRequest(
        _others(r, me)[1:] + (me,), r.dropped),
    "at least": lambda r, me: UnmaskRequest((me, _others(r, me)[0]), _others(r, me)[1:]),
}


@pytest.mark.parametrize("attack", UNMASK_ATTACKS)
def test_a_device_refuses_unmask_requests_that_would_reveal_too_much(attack: str) -> None:
    rig = Rig()
    request = rig.unmask_requests()[rig.me]
    bad = UNMASK_ATTACKS[attack](request, rig.server.participants[rig.me])
    with pytest.raises(SecAggRefused, match=attack):
        rig.clients[rig.me].unmask(bad)


def test_stages_out_of_order_or_replayed_are_refused_by_the_device() -> None:
    rig = Rig()
    client = rig.clients[rig.me]
    with pytest.raises(SecAggRefused, match="out of order or replayed"):
        client.mask(MaskedInputRequest(()), rig.xs[rig.me])
    with pytest.raises(SecAggRefused, match="out of order or replayed"):
        client.advertise()  # already advertised: a replay


def test_a_tampered_ciphertext_is_refused_by_its_recipient_and_the_round_goes_on() -> None:
    rig = Rig(6)
    requests = rig.shares()
    me_req = requests[rig.me]
    sender, box = me_req.ciphertexts[0]
    flipped = box[:-1] + bytes([box[-1] ^ 1])
    with pytest.raises(SecAggRefused, match="authentication"):
        rig.clients[rig.me].mask(MaskedInputRequest(((sender, flipped),) + me_req.ciphertexts[1:]),
                                 rig.xs[rig.me])
    # The victim drops out; the five others finish with the exact sum of their inputs.
    for w, req in requests.items():
        if w != rig.me:
            rig.server.add_masked_input(w, rig.clients[w].mask(req, rig.xs[w]))
    for w, req in rig.server.close_masked_inputs().items():
        rig.server.add_unmask(w, rig.clients[w].unmask(req))
    out = rig.server.finish()
    assert rig.me in out.dropped
    assert np.array_equal(out.total, plain_sum(rig.xs, out.survivors))


def test_the_server_rejects_wrong_stage_replays_and_strangers_without_breaking_the_round() -> None:
    rig = Rig()
    me = rig.me
    with pytest.raises(SecAggRejected, match="share_keys stage, not advertise"):
        rig.server.add_advertisement("late", SecAggClient(rig.p, CTX, b"h" * 32).advertise())
    response = rig.clients[me].share_keys(rig.share_requests[me])
    rig.server.add_shares(me, response)
    with pytest.raises(SecAggRejected, match="already sent"):
        rig.server.add_shares(me, response)
    with pytest.raises(SecAggRejected, match="not a participant"):
        rig.server.add_shares("stranger", response)
    with pytest.raises(SecAggRejected, match="exactly one ciphertext"):
        other = "dev-1"
        bad = ShareKeysResponse(response.ciphertexts[:-1] + ((999, b"x" * 40),))
        rig.server.add_shares(other, bad)
    for w, req in rig.share_requests.items():
        if w != me:
            rig.server.add_shares(w, rig.clients[w].share_keys(req))
    for w, req in rig.server.close_shares().items():
        rig.server.add_masked_input(w, rig.clients[w].mask(req, rig.xs[w]))
    unmask = rig.server.close_masked_inputs()
    honest = rig.clients["dev-1"].unmask(unmask["dev-1"])
    forged = UnmaskResponse(honest.seed_shares + ((42, b"\0" * 64),), honest.key_shares)
    with pytest.raises(SecAggRejected, match="wrong participants"):
        rig.server.add_unmask("dev-1", forged)
    rig.server.add_unmask("dev-1", honest)
    for w, req in unmask.items():
        if w != "dev-1":
            rig.server.add_unmask(w, rig.clients[w].unmask(req))
    out = rig.server.finish()
    assert np.array_equal(out.total, plain_sum(rig.xs, out.survivors))


# ---------------------------------------------------------------- what the server sees


def test_a_masked_upload_alone_is_indistinguishable_from_uniform() -> None:
    p = params(6, 5, 3)
    xs = {f"dev-{i}": np.zeros(200_000, dtype=np.uint32) for i in range(6)}  # worst case
    rig_server: SecAggServer[str] = SecAggServer(p, CTX)
    clients = {w: SecAggClient(p, CTX, b"h" * 32) for w in xs}
    for w, c in clients.items():
        rig_server.add_advertisement(w, c.advertise())
    for w, req in rig_server.close_advertise().items():
        rig_server.add_shares(w, clients[w].share_keys(req))
    req = rig_server.close_shares()["dev-0"]
    masked = clients["dev-0"].mask(req, xs["dev-0"])
    counts = np.bincount((masked >> np.uint32(24)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4
    low = np.bincount((masked & np.uint32(0xFF)).astype(np.int64), minlength=256)
    assert stats.chisquare(low).pvalue > 1e-4


# ---------------------------------------------------------------- fuzzing the server's messages


def _mutate_peers(peers: tuple[PeerKeys, ...], data: st.DataObject) -> tuple[PeerKeys, ...]:
    out = list(peers)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["drop", "duplicate", "index", "key", "hash", "add"]))
        if not out and op != "add":
            continue
        i = data.draw(st.integers(0, max(0, len(out) - 1)))
        if op == "drop":
            out.pop(i)
        elif op == "duplicate":
            out.append(out[i])
        elif op == "index":
            out[i] = dataclasses.replace(out[i], index=data.draw(st.integers(0, 12)))
        elif op == "key":
            out[i] = dataclasses.replace(out[i], mask_public=data.draw(st.binary(max_size=40)))
        elif op == "hash":
            out[i] = dataclasses.replace(out[i], config_hash=data.draw(st.binary(max_size=33)))
        else:
            out.append(PeerKeys(data.draw(st.integers(0, 12)), data.draw(st.binary(max_size=33)),
                                data.draw(st.binary(max_size=33)), b"h" * 32))
    return tuple(out)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzzed_neighbour_lists_are_refused_cleanly_or_are_harmless(data: st.DataObject) -> None:
    rig = Rig()
    honest = rig.share_requests[rig.me]
    request = ShareKeysRequest(honest.index, _mutate_peers(honest.peers, data))
    try:
        response = rig.clients[rig.me].share_keys(request)
    except SecAggRefused:
        return
    # Accepted: then it was a valid neighbour list, and shares went only to listed peers.
    assert {v for v, _ in response.ciphertexts} == {p.index for p in request.peers}
    assert len({p.index for p in request.peers}) == len(request.peers)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_fuzzed_unmask_requests_never_reveal_both_shares_of_a_peer(data: st.DataObject) -> None:
    rig = Rig(6)
    honest = rig.unmask_requests()[rig.me]
    pool = st.integers(0, 9)
    survivors = data.draw(st.lists(pool, max_size=8)) + (
        list(honest.survivors) if data.draw(st.booleans()) else [])
    dropped = data.draw(st.lists(pool, max_size=4))
    try:
        response = rig.clients[rig.me].unmask(UnmaskRequest(tuple(survivors), tuple(dropped)))
    except SecAggRefused:
        return
    seeds = {v for v, _ in response.seed_shares}
    keys_ = {v for v, _ in response.key_shares}
    assert not seeds & keys_
    assert rig.server.participants[rig.me] in seeds
    assert len(seeds) >= rig.p.threshold
