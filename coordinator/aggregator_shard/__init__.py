"""An aggregator shard (``fedctl aggregator serve``, issue 17): takes the clear uploads of
the devices a coordinator assigned to it, each under a ticket the coordinator signed
(:mod:`core.shards`), and hands the coordinator one partial sum per round.

Plain Python, no gRPC: :class:`ShardState` holds the rounds (:mod:`.state`), checking an
upload against its ticket is :mod:`.checks`, a round's running sum is :mod:`.accumulator`.
The servicer (:mod:`coordinator.transport.aggregator_servicer`) and the composition root
(:mod:`coordinator.shard_app`) sit above.
"""

from coordinator.aggregator_shard.state import RETAIN_S, RoundProgress, ShardState, ShardUpload

__all__ = ["RETAIN_S", "RoundProgress", "ShardState", "ShardUpload"]
