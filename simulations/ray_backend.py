"""Scale-out over Ray (an optional extra): the cohort of a round is split across Ray actors,
each holding the federation's data once and training its share with the configured
in-process trainer; results are merged back in job order.

Ray serializes the global weights, the jobs and the results with its own pickle-based
protocol; this is confined to the simulation (the production wire never pickles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from simulations.algorithms import local_objective
from simulations.cohort import CohortResult, DeviceJob, DeviceTable, full_steps, make_trainer
from simulations.cohort_split import merge_results, split_jobs
from simulations.config import SimulationConfig, load_apps
from simulations.data import FederatedData
from simulations.errors import BackendUnavailable


class _Worker:
    """A Ray actor's state: the data table and a trainer built on it."""

    def __init__(self, config: SimulationConfig, data: FederatedData) -> None:
        torch.set_num_threads(config.engine.threads)
        load_apps(config.apps)
        self._trainer = make_trainer(config.engine.kind, config.model, DeviceTable(data),
                                     config.local, local_objective(config.algorithm))

    def train(self, global_params: dict[str, np.ndarray], jobs: list[DeviceJob],
              corrections: dict[str, np.ndarray] | None) -> CohortResult:
        return self._trainer.train(
            {n: torch.from_numpy(v) for n, v in global_params.items()}, jobs,
            None if corrections is None else {n: torch.from_numpy(v)
                                              for n, v in corrections.items()})


class RayCohortTrainer:
    """Connects to Ray at ``address`` (``"local"`` starts a local one) and starts
    ``config.engine.workers`` actors. Call :meth:`shutdown` when done.

    Raises:
        BackendUnavailable: Ray is not installed or the cluster cannot be reached.
    """

    def __init__(self, address: str, config: SimulationConfig, data: FederatedData, *,
                 init_kwargs: Mapping[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise BackendUnavailable(
                "--ray needs Ray: pip install 'ray>=2.9,<3' (in a fedcoord checkout: "
                "pip install -e '.[ray]'; from a release: pip install 'fedcoord[ray]')") from None
        self._ray = ray
        try:
            if not ray.is_initialized():
                ray.init(address=None if address == "local" else address,
                         include_dashboard=False, log_to_driver=False,
                         **dict(init_kwargs or {}))
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise BackendUnavailable(f"cannot reach Ray at {address!r}: {exc}") from None
        actor: Any = ray.remote(num_cpus=1)(_Worker)
        data_ref = ray.put(data)
        self._workers: list[Any] = [actor.remote(config, data_ref)
                         for _ in range(config.engine.workers)]
        self._sizes = data.sizes()
        self._local = config.local

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        costs = [full_steps(int(self._sizes[j.device]), self._local) for j in jobs]
        groups = [g for g in split_jobs(jobs, costs, len(self._workers)) if g]
        params = {n: p.detach().numpy() for n, p in global_params.items()}
        params_ref = self._ray.put(params)
        futures = []
        for worker, group in zip(self._workers, groups, strict=False):
            corr = (None if corrections is None
                    else {n: c[group].numpy() for n, c in corrections.items()})
            futures.append(worker.train.remote(params_ref, [jobs[i] for i in group], corr))
        parts: list[CohortResult] = self._ray.get(futures)
        return merge_results(groups, parts, global_params)

    def shutdown(self) -> None:
        for worker in self._workers:
            self._ray.kill(worker)
        self._workers = []
