"""One SecAgg+ round with every participant in this process: for simulations, benchmarks and
tests. The same client and server objects as over the network, minus the network.

``drops[stage]`` names participants that vanish before sending their message of that stage
(Stage.ADVERTISE .. Stage.UNMASK); a dropped participant stays dropped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from core.secagg.client import SecAggClient
from core.secagg.messages import RingVector, Stage
from core.secagg.params import SecAggParams
from core.secagg.server import SecAggResult, SecAggServer

P = TypeVar("P", bound=Hashable)


@dataclass
class Timings:
    """Seconds spent in participants' code (summed over all of them) and in the server's."""

    clients_s: float = 0.0
    server_s: float = 0.0
    per_stage_clients_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class InProcessRound(Generic[P]):
    result: SecAggResult[P]
    timings: Timings


def run_round(params: SecAggParams, inputs: Mapping[P, RingVector], *, context: bytes,
              config_hash: bytes = b"\0" * 32,
              drops: Mapping[Stage, set[P]] | None = None,
              rng: random.Random | None = None) -> InProcessRound[P]:
    """Raises SecAggAborted (from the server) when the drops leave too few holders."""
    drops = drops or {}
    timings = Timings()
    clock = time.perf_counter
    start = clock()
    clients = {who: SecAggClient(params, context, config_hash) for who in inputs}
    server: SecAggServer[P] = SecAggServer(params, context, rng)
    timings.clients_s += clock() - start
    gone: set[P] = set()

    def live(stage: Stage, addressed: Mapping[P, object] | None = None) -> list[P]:
        gone.update(drops.get(stage, set()))
        pool = list(addressed) if addressed is not None else list(clients)
        return [w for w in pool if w not in gone]

    def client_time(stage: Stage, seconds: float) -> None:
        timings.clients_s += seconds
        name = stage.name.lower()
        timings.per_stage_clients_s[name] = timings.per_stage_clients_s.get(name, 0.0) + seconds

    for who in live(Stage.ADVERTISE):
        t0 = clock()
        advert = clients[who].advertise()
        client_time(Stage.ADVERTISE, clock() - t0)
        server.add_advertisement(who, advert)
    t0 = clock()
    share_requests = server.close_advertise()
    timings.server_s += clock() - t0
    for who in live(Stage.SHARE_KEYS, share_requests):
        t0 = clock()
        shares = clients[who].share_keys(share_requests[who])
        client_time(Stage.SHARE_KEYS, clock() - t0)
        server.add_shares(who, shares)
    t0 = clock()
    mask_requests = server.close_shares()
    timings.server_s += clock() - t0
    for who in live(Stage.MASKED_INPUT, mask_requests):
        t0 = clock()
        masked = clients[who].mask(mask_requests[who], inputs[who])
        client_time(Stage.MASKED_INPUT, clock() - t0)
        t0 = clock()
        server.add_masked_input(who, masked)
        timings.server_s += clock() - t0
    t0 = clock()
    unmask_requests = server.close_masked_inputs()
    timings.server_s += clock() - t0
    for who in live(Stage.UNMASK, unmask_requests):
        t0 = clock()
        response = clients[who].unmask(unmask_requests[who])
        client_time(Stage.UNMASK, clock() - t0)
        server.add_unmask(who, response)
    t0 = clock()
    result = server.finish()
    timings.server_s += clock() - t0
    return InProcessRound(result, timings)
