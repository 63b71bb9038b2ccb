"""Flower 1.42's simulation engine on :mod:`benchmarks.simulation`'s workload.

A ServerApp and a ClientApp run under ``flwr.simulation.run_simulation`` (Ray backend given
``cpus`` CPUs, one CPU per ClientApp, so ``cpus`` ClientApp actors, each with one torch
thread), in this process; the benchmark runs
it in a child process group with a hard timeout.

* ServerApp: Flower's message-API ``FedAvg`` strategy (``flwr.serverapp.strategy``), whose
  ``configure_train`` is replaced so that round ``r`` sends one train message for each device
  of ``workload.schedule[r-1]`` (its index and shuffling seed in the message's config, the
  global model as an ``ArrayRecord``), instead of sampling nodes itself. Aggregation is
  Flower's own (``aggregate_arrayrecords``, weighted by ``num-examples``). There is no
  federated evaluation. A round is timed from ``configure_train`` to the end of
  ``aggregate_train``, inside the ServerApp.
* ClientApp: loads the device's rows of the training table (memory-mapped ``.npy`` files
  written once before the simulation starts), builds the same torch model and trains it with
  :func:`core.training.train_local`, exactly as the sequential loop does; replies with the
  trained ``state_dict`` and ``num-examples``.

Which virtual SuperNode runs a device does not matter (the device is named in the message),
so the 100 messages of a round go to 100 distinct nodes of the ``devices`` nodes.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from core.types import LocalTraining, ModelSpec

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

RAY_OBJECT_STORE_BYTES = 1024**3


class RoundClock(Protocol):
    def start(self) -> None: ...
    def round_done(self) -> None: ...
    def stop(self) -> None: ...


def run_flower(*, x: np.ndarray, y: np.ndarray, offsets: np.ndarray, schedule: list[list[int]],
               seeds: list[list[int]], spec: ModelSpec, local: LocalTraining,
               initial: dict[str, np.ndarray], clock: RoundClock,
               cpus: int | None = None) -> dict[str, np.ndarray]:
    """Runs ``len(schedule)`` Flower rounds on ``cpus`` ClientApp actors (default: one per
    core); ``clock.start()`` just before ``run_simulation``,
    ``clock.round_done()`` after each round's aggregation. Returns the final global model.

    Raises:
        RuntimeError: a round got fewer replies than it sent messages.
    """
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    with tempfile.TemporaryDirectory(prefix="flower-sim-") as tmp:
        data_dir = Path(tmp)
        np.save(data_dir / "x.npy", x)
        np.save(data_dir / "y.npy", y)
        np.save(data_dir / "offsets.npy", offsets)
        final: dict[str, np.ndarray] = {}
        server = _server_app(schedule, seeds, initial, clock, final)
        client = _client_app(str(data_dir), spec, local)
        cpus = cpus or len(os.sched_getaffinity(0))
        backend_config: Any = {
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "object_store_memory": RAY_OBJECT_STORE_BYTES},
        }
        clock.start()
        run_simulation(server_app=server, client_app=client, num_supernodes=len(offsets) - 1,
                       backend_config=backend_config)
        clock.stop()
    if len(final) == 0:
        raise RuntimeError("the Flower simulation ended without a final model (see its log)")
    return final


def _server_app(schedule: list[list[int]], seeds: list[list[int]],
                initial: dict[str, np.ndarray], clock: RoundClock,
                final: dict[str, np.ndarray]) -> ServerApp:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    names = list(initial)

    class ScheduledFedAvg(FedAvg):  # type: ignore[misc]
        """FedAvg that trains exactly the schedule's devices each round."""

        def configure_train(self, server_round: int, arrays: ArrayRecord,
                            config: ConfigRecord, grid: Grid) -> Iterable[Message]:
            devices = schedule[server_round - 1]
            nodes = sorted(grid.get_node_ids())
            while len(nodes) < len(devices):  # the nodes register while Ray starts
                time.sleep(0.05)
                nodes = sorted(grid.get_node_ids())
            return [Message(content=RecordDict({
                        "arrays": arrays,
                        "config": ConfigRecord({"device": d, "seed": s,
                                                "server-round": server_round})}),
                            message_type=MessageType.TRAIN, dst_node_id=node)
                    for d, s, node in zip(devices, seeds[server_round - 1], nodes, strict=False)]

        def aggregate_train(self, server_round: int, replies: Iterable[Message]
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            ok = [m for m in replies if not m.has_error()]
            if len(ok) != len(schedule[server_round - 1]):
                errors = [m.error.reason for m in replies if m.has_error()][:3]
                raise RuntimeError(f"round {server_round}: {len(ok)} of "
                                   f"{len(schedule[server_round - 1])} replies; {errors}")
            arrays, metrics = super().aggregate_train(server_round, ok)
            clock.round_done()
            if server_round == len(schedule) and arrays is not None:
                final.update(zip(names, arrays.to_numpy_ndarrays(), strict=True))
            return arrays, metrics

    app = ServerApp()

    @app.main()  # type: ignore[untyped-decorator]
    def main(grid: Grid, context: Any) -> None:
        strategy = ScheduledFedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        strategy.start(grid=grid, num_rounds=len(schedule),
                       initial_arrays=ArrayRecord([initial[n] for n in names]))

    return app


def _client_app(data_dir: str, spec: ModelSpec, local: LocalTraining) -> ClientApp:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()
    cache: dict[str, Any] = {}

    @app.train()  # type: ignore[untyped-decorator]
    def train(msg: Message, context: Any) -> Message:
        import torch

        from core.models import build_model
        from core.training import train_local

        if not cache:  # once per Ray actor
            torch.set_num_threads(1)
            cache["x"] = np.load(Path(data_dir) / "x.npy", mmap_mode="r")
            cache["y"] = np.load(Path(data_dir) / "y.npy", mmap_mode="r")
            cache["offsets"] = np.load(Path(data_dir) / "offsets.npy")
            cache["model"] = build_model(spec)
        config = msg.content["config"]
        device, seed = int(config["device"]), int(config["seed"])
        lo, hi = int(cache["offsets"][device]), int(cache["offsets"][device + 1])
        model = cache["model"]
        arrays = msg.content["arrays"].to_numpy_ndarrays()
        with torch.no_grad():
            for p, value in zip(model.parameters(), arrays, strict=True):
                p.copy_(torch.from_numpy(value))
        result = train_local(model, cache["x"][lo:hi], cache["y"][lo:hi], local, seed=seed)
        trained = [p.detach().numpy().copy() for p in model.parameters()]
        return Message(content=RecordDict({
            "arrays": ArrayRecord(trained),
            "metrics": MetricRecord({"num-examples": result.num_examples,
                                     "train_loss": result.loss})}), reply_to=msg)

    return app
