"""The coordinator's gRPC client of its shards: what a shard was seen to accept is kept across
polls (a shard that restarted cannot make the coordinator forget), and one shard's answer is
taken as soon as it comes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from coordinator.settings import ShardSettings
from coordinator.transport.shard_client import GrpcShardPool
from core.shards import KEY_BYTES, RoundKey
from protos.fedcoord.v1 import aggregator_pb2

KEY = RoundKey("task-p", 7)


class Answered:
    """A finished RoundProgress call, as gRPC's future hands it to the callback."""

    def __init__(self, reported: list[str]) -> None:
        self._answer = aggregator_pb2.RoundProgressResponse(rounds=[
            aggregator_pb2.ShardRoundProgress(
                round=aggregator_pb2.ShardRoundKey(task_id=KEY.task_id, round_id=KEY.round_id),
                reported=reported)])

    def result(self) -> aggregator_pb2.RoundProgressResponse:
        return self._answer


class Unreachable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


class Failed:
    def result(self) -> None:
        raise Unreachable()


@pytest.fixture
def pool() -> Iterator[GrpcShardPool]:
    p = GrpcShardPool(ShardSettings(addresses=("127.0.0.1:1", "127.0.0.1:2"),
                                    key=b"k" * KEY_BYTES, call_timeout_s=0.2))
    with p._lock:
        p._watched.add(KEY)  # watched, without starting the poller (nobody listens there)
        p._reported[KEY] = {}
    yield p
    p.close()


def test_what_a_shard_was_seen_to_accept_is_kept_across_polls(pool: GrpcShardPool) -> None:
    pool._take_progress(1, Answered(["b", "c"]))
    pool._take_progress(1, Answered(["d"]))  # restarted: it forgot b and c
    assert pool.reported(KEY) == {1: frozenset({"b", "c", "d"})}


def test_a_shard_that_fails_a_poll_is_not_healthy_until_it_answers(
        pool: GrpcShardPool) -> None:
    pool._take_progress(0, Failed())
    assert pool.healthy() == [1]
    pool._take_progress(0, Answered([]))
    assert pool.healthy() == [0, 1]


def test_a_collect_of_another_size_is_refused_before_anything_is_allocated() -> None:
    from coordinator.rounds.shards import ShardUnavailable
    from core.shards import PartialSum, ShardMode, admin_token, derive_shard_key
    from protos import convert
    from protos.fedcoord.v1 import aggregator_pb2_grpc

    master = b"m" * KEY_BYTES

    class Shard(aggregator_pb2_grpc.AggregatorServiceServicer):  # type: ignore[misc]
        def CollectRound(self, request, context):  # type: ignore[no-untyped-def]
            assert dict(context.invocation_metadata())["x-fedcoord-shard-auth"] == \
                admin_token(derive_shard_key(master, 0))
            import numpy as np
            part = PartialSum(ShardMode.FEDAVG, np.zeros(4), ["a"], weight=1.0)
            header = convert.partial_sum_header_to_proto(KEY, part)
            header.values = 1 << 40  # a header claiming 8 TiB
            yield aggregator_pb2.CollectRoundResponse(header=header)

    from concurrent.futures import ThreadPoolExecutor
    server = grpc.server(ThreadPoolExecutor(2))
    aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server(Shard(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    p = GrpcShardPool(ShardSettings(addresses=(f"127.0.0.1:{port}",), key=master))
    try:
        with pytest.raises(ShardUnavailable, match="1099511627776 values; the model has 4"):
            p.collect(KEY, 0, 4)
    finally:
        p.close()
        server.stop(None)
