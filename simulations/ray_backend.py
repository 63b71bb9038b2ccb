"""Scale-out over Ray (an optional extra): the cohort of a round is split across Ray actors,
which train their share with the configured in-process trainer; results are merged back in
job order.

The cluster is any Ray cluster: ``"local"`` starts one in this process, ``"auto"`` joins the
one ``RAY_ADDRESS`` names (or the one ``ray start`` left on this machine), ``HOST:PORT`` joins
the head at that address (``ray start --head`` on one machine, ``ray start --address
HOST:PORT`` on the others; every node needs fedcoord and its dependencies installed, as the
actors import :mod:`simulations`). The actors are spread over the nodes (Ray's ``SPREAD``
strategy, one CPU each); :meth:`RayCohortTrainer.worker_nodes` says where they run.

Where the data live:

- ``load: all`` (:class:`~simulations.data.FederatedData`): every actor holds the
  federation's data once (one object in Ray's store, read by the actors of each node);
- ``load: per_round`` (:class:`~simulations.population.OnDemandPopulation`): the driver
  generates the admitted devices' data (it needs their sizes to select, as the coordinator
  learns a device's size from its report) and sends each actor a table of its own share's
  rows with its jobs: an actor holds one round's share, nothing else.

Ray serializes the global weights, the jobs, the tables and the results with its own
pickle-based protocol; this is confined to the simulation (the production wire never
pickles).
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
from simulations.population import OnDemandPopulation, train_on_table


class _Worker:
    """A Ray actor's state: the configuration, and with ``data`` (``load: all``) a trainer
    on the federation's table."""

    def __init__(self, config: SimulationConfig, data: FederatedData | None) -> None:
        torch.set_num_threads(config.engine.threads)
        load_apps(config.apps)
        self._config = config
        self._objective = local_objective(config.algorithm)
        self._trainer = None if data is None else make_trainer(
            config.engine.kind, config.model, DeviceTable(data), config.local, self._objective)
        self._jobs_trained = 0

    def jobs_trained(self) -> int:
        """Jobs (devices) this actor has trained."""
        return self._jobs_trained

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def train(self, global_params: dict[str, np.ndarray], jobs: list[DeviceJob],
              corrections: dict[str, np.ndarray] | None,
              table: DeviceTable | None = None) -> CohortResult:
        """Trains ``jobs``: on the resident data, or (``table``) on the given cohort table,
        whose device ``i`` is job ``i``'s."""
        params = {n: torch.from_numpy(v) for n, v in global_params.items()}
        corr = None if corrections is None else {n: torch.from_numpy(v)
                                                 for n, v in corrections.items()}
        self._jobs_trained += len(jobs)
        if table is not None:
            config = self._config
            return train_on_table(table, jobs, params, corr, kind=config.engine.kind,
                                  model=config.model, local=config.local,
                                  objective=self._objective, threads=config.engine.threads)
        assert self._trainer is not None, "an actor without data needs a table"
        return self._trainer.train(params, jobs, corr)


class RayCohortTrainer:
    """Connects to Ray at ``address`` (module docstring; ``init_kwargs`` go to
    ``ray.init``) and starts ``config.engine.workers`` actors, spread over the cluster's
    nodes. ``data``: the federation's data (``load: all``) or the population the
    simulation draws from (``load: per_round``; pass the same object to
    :class:`~simulations.engine.Simulation` as ``population=``). Call :meth:`shutdown`
    when done (it leaves Ray connected: ``ray.shutdown()`` is the caller's).

    Raises:
        BackendUnavailable: Ray is not installed or the cluster cannot be reached.
    """

    def __init__(self, address: str, config: SimulationConfig,
                 data: FederatedData | OnDemandPopulation, *,
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
        actor: Any = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_Worker)
        if isinstance(data, OnDemandPopulation):
            self._population: OnDemandPopulation | None = data
            data_ref: Any = None
            self._sizes: np.ndarray | None = None
        else:
            self._population = None
            data_ref = ray.put(data)
            self._sizes = data.sizes()
        self._workers: list[Any] = [actor.remote(config, data_ref)
                                    for _ in range(config.engine.workers)]
        self._local = config.local

    def worker_nodes(self) -> list[str]:
        """The Ray node id of each actor (waits until they have started)."""
        return list(self._ray.get([w.node_id.remote() for w in self._workers]))

    def jobs_by_node(self) -> dict[str, int]:
        """Jobs trained so far on each node that runs an actor."""
        counts = self._ray.get([w.jobs_trained.remote() for w in self._workers])
        out: dict[str, int] = {}
        for node, count in zip(self.worker_nodes(), counts, strict=True):
            out[node] = out.get(node, 0) + int(count)
        return out

    def train(self, global_params: Mapping[str, torch.Tensor], jobs: Sequence[DeviceJob],
              corrections: Mapping[str, torch.Tensor] | None = None) -> CohortResult:
        sizes = (self._sizes if self._sizes is not None else
                 self._population.sizes if self._population is not None else None)
        assert sizes is not None
        costs = [full_steps(int(sizes[j.device]), self._local) for j in jobs]
        groups = [g for g in split_jobs(jobs, costs, len(self._workers)) if g]
        params = {n: p.detach().numpy() for n, p in global_params.items()}
        params_ref = self._ray.put(params)
        futures = []
        for worker, group in zip(self._workers, groups, strict=False):
            group_jobs = [jobs[i] for i in group]
            corr = (None if corrections is None
                    else {n: c[group].numpy() for n, c in corrections.items()})
            table = (None if self._population is None
                     else self._population.table([j.device for j in group_jobs]))
            futures.append(worker.train.remote(params_ref, group_jobs, corr, table))
        parts: list[CohortResult] = self._ray.get(futures)
        return merge_results(groups, parts, global_params)

    def shutdown(self) -> None:
        for worker in self._workers:
            self._ray.kill(worker)
        self._workers = []
