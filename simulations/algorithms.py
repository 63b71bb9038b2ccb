"""Federated algorithms: what devices add to their local objective, and how the server turns
their trained models into the next global model.

The server step is always the coordinator's: the example-weighted mean of the deltas
(:func:`core.aggregation.fedavg.weighted_mean`), then the configured server optimizer
(:func:`core.aggregation.server_optimizers.apply_server_optimizer`).

- FedAvg: plain local SGD.
- FedProx (Li et al., 2020): local objective ``f(w) + mu/2 ||w - w_global||^2``; partial work
  is the engine's business (:mod:`simulations.devices`). ``mu = 0`` is FedAvg exactly.
- SCAFFOLD (Karimireddy et al., 2020): local gradients corrected by ``c - c_i``; after
  ``K`` local steps with learning rate ``lr`` a device's control variate becomes
  ``c_i+ = c_i - c + (x - y_i) / (K lr)`` (option II), and the server moves
  ``c += |S| / N * mean(c_i+ - c_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from core.aggregation.fedavg import StreamingWeightedMean, weighted_mean
from core.aggregation.server_optimizers import apply_server_optimizer
from core.types import ServerOptimizer
from simulations.aggregation import CohortAggregator
from simulations.cohort import CohortResult, LocalObjective
from simulations.config import AlgorithmConfig, AlgorithmKind

State = dict[str, np.ndarray]


class FederatedAlgorithm:
    """FedAvg and FedProx (they differ only in the local objective); the base of SCAFFOLD.
    Keeps the server optimizer's state between rounds. Not thread-safe."""

    def __init__(self, config: AlgorithmConfig, server: ServerOptimizer,
                 aggregator: CohortAggregator | None = None) -> None:
        self.config = config
        self.server = server
        self.server_state: State = {}
        #: Secure aggregation and central DP, as the coordinator does them; None: plain mean.
        self.aggregator = aggregator
        # The server step's first call imports what torch.optim needs (torch._dynamo: 1-2 s
        # and ~70 MB): paid here, with the set-up, not by the first round.
        one = {"w": np.zeros(1, dtype=np.float32)}
        apply_server_optimizer(one, one, server, None)

    def local_objective(self) -> LocalObjective:
        return local_objective(self.config)

    def corrections(self, global_params: Mapping[str, np.ndarray], devices: Sequence[int]
                    ) -> dict[str, torch.Tensor] | None:
        """Per-device gradient corrections stacked ``[devices, ...]``, or None."""
        return None

    def server_update(self, global_params: State, devices: Sequence[int], result: CohortResult,
                      ) -> State:
        """The next global model from the cohort's trained models (job order = ``devices``)."""
        if self.aggregator is not None:
            _need_each_device(result, "secure aggregation, central DP and robust rules")
            mean_delta = self.aggregator.mean_delta(
                global_params, {n: t.numpy() for n, t in result.params.items()},
                [int(n) for n in result.num_examples])
        else:
            mean_delta = mean_deltas(global_params, result)
        new_params, self.server_state = apply_server_optimizer(
            global_params, mean_delta, self.server, self.server_state)
        return new_params


class Scaffold(FederatedAlgorithm):
    """SCAFFOLD with per-device control variates kept for every device that took part
    (zeros until then): memory ``O(model x devices seen)``."""

    def __init__(self, config: AlgorithmConfig, server: ServerOptimizer, *, num_devices: int,
                 learning_rate: float, aggregator: CohortAggregator | None = None) -> None:
        super().__init__(config, server, aggregator)
        self._num_devices = num_devices
        self._lr = learning_rate
        self._c: State = {}
        self._c_device: dict[int, State] = {}

    def corrections(self, global_params: Mapping[str, np.ndarray], devices: Sequence[int]
                    ) -> dict[str, torch.Tensor] | None:
        out = {}
        for name, value in global_params.items():
            c = self._c.get(name, np.zeros_like(value))
            out[name] = torch.from_numpy(np.stack([
                c - self._c_device[d][name] if d in self._c_device else c for d in devices
            ]).astype(np.float32))
        return out

    def server_update(self, global_params: State, devices: Sequence[int], result: CohortResult,
                      ) -> State:
        _need_each_device(result, "SCAFFOLD's control variates")
        deltas_c: dict[str, list[np.ndarray]] = {name: [] for name in global_params}
        for i, device in enumerate(devices):
            steps = int(result.steps[i])
            old = self._c_device.get(device, {})
            new: State = {}
            for name, x in global_params.items():
                c_i = old.get(name, np.zeros_like(x))
                c = self._c.get(name, np.zeros_like(x))
                y_i = result.params[name][i].numpy()
                new[name] = (c_i - c + (x - y_i) / (steps * self._lr)).astype(np.float32)
                deltas_c[name].append(new[name] - c_i)
            self._c_device[device] = new
        share = len(devices) / self._num_devices
        ones = [1.0] * len(devices)
        for name, x in global_params.items():
            c = self._c.get(name, np.zeros_like(x))
            self._c[name] = (c + share * weighted_mean(deltas_c[name], ones)).astype(np.float32)
        return super().server_update(global_params, devices, result)


def local_objective(config: AlgorithmConfig) -> LocalObjective:
    """The extra local-gradient terms every device of ``config``'s algorithm adds."""
    return LocalObjective(prox_mu=config.mu if config.kind is AlgorithmKind.FEDPROX else 0.0)


def make_algorithm(config: AlgorithmConfig, server: ServerOptimizer, *, num_devices: int,
                   learning_rate: float, aggregator: CohortAggregator | None = None
                   ) -> FederatedAlgorithm:
    if config.kind is AlgorithmKind.SCAFFOLD:
        return Scaffold(config, server, num_devices=num_devices, learning_rate=learning_rate,
                        aggregator=aggregator)
    return FederatedAlgorithm(config, server, aggregator)


def _need_each_device(result: CohortResult, what: str) -> None:
    if result.delta_sum is not None:
        raise ValueError(f"{what} need each device's model; the trainer returned only the "
                         "cohort's summed deltas (build it without sum_deltas)")


def mean_deltas(global_params: Mapping[str, np.ndarray], result: CohortResult) -> State:
    """Example-weighted mean of ``trained - global`` per tensor, through the coordinator's
    accumulator (:class:`~core.aggregation.fedavg.StreamingWeightedMean`, what
    :func:`~core.aggregation.fedavg.weighted_mean` runs); from ``result.delta_sum`` when
    the trainer summed the deltas itself (the same sum and division, the devices' terms
    added in another order)."""
    weights = [float(n) for n in result.num_examples]
    if result.delta_sum is not None:
        if not weights:
            raise ValueError("need at least one update, got none")
        total = math.fsum(weights)
        return {name: (result.delta_sum[name] / total).astype(np.float32).reshape(x.shape)
                for name, x in global_params.items()}
    out: State = {}
    for name, x in global_params.items():
        # weighted_mean's accumulator fed one device's delta at a time: a stacked
        # [devices, ...] delta would double the cohort's memory for large models (a
        # 1.07M-parameter MLP: 430 MB for 100 devices). Same arithmetic, same order.
        trained = result.params[name].numpy()
        if len(trained) != len(weights) or not weights:
            raise ValueError(f"need one weight per update and at least one update, got "
                             f"{len(trained)} updates and {len(weights)} weights")
        accumulator = StreamingWeightedMean(x.size)
        for device, weight in zip(trained, weights, strict=True):
            accumulator.add_chunk(0, device - x, weight)
            accumulator.finish_update(weight)
        out[name] = accumulator.mean().reshape(x.shape)
    return out
