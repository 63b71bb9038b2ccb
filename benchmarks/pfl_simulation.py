"""Apple's pfl (pfl-research 0.6) simulation on :mod:`benchmarks.simulation`'s workload.

pfl's own simulation machinery (the benchmark runs it in a child process group with a hard
timeout): with one worker in this process (:func:`run_pfl`); with N workers
(:func:`run_pfl_distributed`) as pfl runs a distributed simulation, N processes started by
``torchrun --standalone`` (it ships with torch; torch.distributed with the gloo backend on
CPU, no Horovod or MPI), each training its share of every cohort and all-reducing the
aggregate once a round:

* model: :class:`pfl.model.pytorch.PyTorchModel` around the same torch model
  (:func:`core.models.build_model`, initial weights ``initial``), with a fresh
  ``torch.optim.SGD`` (lr and momentum of ``local``) per device and ``torch.optim.SGD(lr=1)``
  as the central optimizer, so the server step is ``global += weighted mean delta``.
* data: :class:`pfl.data.federated_dataset.FederatedDataset` whose user sampler yields the
  schedule's (device, seed) pairs in order, so round ``r``'s cohort of
  ``len(schedule[r-1])`` users is exactly ``schedule[r-1]`` (checked after the run, over all
  workers). With N workers it gets ``user_id_to_weight`` (each device's example count), so
  pfl splits each cohort across workers by load, as its documentation advises for speed.
  ``make_dataset_fn`` builds the device's :class:`pfl.data.dataset.Dataset` from its rows of
  the training table, permuted by ``torch.randperm`` with a generator seeded by the device's
  seed: pfl iterates a user's data in order, so this gives exactly the minibatches that
  :func:`core.training.train_local` draws (1 epoch).
* algorithm: :class:`pfl.algorithm.FederatedAveraging` (local SGD through pfl's PyTorch SGD
  bridge, ``NNTrainHyperParams(local_num_epochs, local_batch_size, local_learning_rate)``),
  with pfl's per-user before/after evaluation turned off (it would otherwise run in round 1,
  ``iteration % evaluation_frequency == 0``); no validation cohort.
* backend: :class:`pfl.aggregate.simulate.SimulatedBackend` with the
  :class:`pfl.aggregate.weighting.WeightByDatapoints` postprocessor: FedAvg weighted by
  examples, as the other engines. Metrics are not sent to the platform (it prints them).

A round is timed by a :class:`pfl.callback.base.TrainingProcessCallback`
(``after_central_iteration``, after the central model update); the clock starts just before
``algorithm.run``. With N workers, worker 0's clock is reported (the workers meet at every
round's all-reduce); ``time.perf_counter`` is the system-wide monotonic clock on Linux, so
its readings are comparable with the parent's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from core.models import build_model, load_numpy_state, state_to_numpy
from core.types import LocalOptimizerKind, LocalTraining, ModelSpec

SCHEDULE = ("exact: a FederatedDataset whose user sampler yields the fixed schedule's "
            "devices in order; cohort r = schedule[r-1]")


class RoundClock(Protocol):
    def start(self) -> None: ...
    def round_done(self) -> None: ...
    def stop(self) -> None: ...


def pfl_unavailable() -> str | None:
    """Why pfl cannot run here, or ``None`` when it can."""
    try:
        import pfl.aggregate.simulate  # noqa: F401
        import pfl.algorithm  # noqa: F401
        import pfl.model.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip"
        return f"pfl not importable: {type(e).__name__}: {e}"
    return None


class _Net(nn.Module):
    """The benchmark's model with the ``loss`` and ``metrics`` methods pfl requires."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        from pfl.metrics import Weighted

        logits = self.net(x)
        n = len(y)
        return {"loss": Weighted(float(nn.functional.cross_entropy(logits, y,
                                                                   reduction="sum")), n),
                "accuracy": Weighted(float((logits.argmax(1) == y).sum()), n)}


def run_pfl(*, x: np.ndarray, y: np.ndarray, offsets: np.ndarray, schedule: list[list[int]],
            seeds: list[list[int]], spec: ModelSpec, local: LocalTraining,
            initial: dict[str, np.ndarray], clock: RoundClock) -> dict[str, np.ndarray]:
    """Runs ``len(schedule)`` pfl central iterations in this process, one worker of
    ``WORLD_SIZE`` when started by torchrun; ``clock.start()`` just before ``algorithm.run``,
    ``clock.round_done()`` after each central model update. Returns the final global model.

    Raises:
        ValueError: local training other than plain SGD, or a cohort size that changes
            between rounds (pfl's ``train_cohort_size`` is one number here).
        RuntimeError: pfl trained other devices than the schedule's.
    """
    os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")  # CPU against CPU
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    if local.optimizer is not LocalOptimizerKind.SGD:
        raise ValueError(f"the pfl runner trains with SGD, got {local.optimizer.value!r}")
    sizes = {len(devices) for devices in schedule}
    if len(sizes) != 1:
        raise ValueError(f"pfl needs one cohort size, the schedule has {sorted(sizes)}")
    cohort = sizes.pop()
    world = get_default_framework_module().distributed.world_size

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    trained: list[int] = []  # stream positions of the users this worker built, in order

    def make_dataset(user: tuple[int, int, int]) -> Dataset:
        position, device, seed = user
        lo, hi = int(offsets[device]), int(offsets[device + 1])
        order = torch.randperm(hi - lo, generator=torch.Generator().manual_seed(seed)) + lo
        trained.append(position)
        return Dataset((xt[order], yt[order]), user_id=str(device))

    users = [(i, d, s) for i, (d, s) in enumerate(
        (d, s) for devices, round_seeds in zip(schedule, seeds, strict=True)
        for d, s in zip(devices, round_seeds, strict=True))]
    # Endless: with weights, pfl's sampler process reads ahead of the last cohort.
    sampler = functools.partial(next, itertools.cycle(users))
    weights = ({u: int(offsets[u[1] + 1] - offsets[u[1]]) for u in users}
               if world > 1 else None)
    training_data = FederatedDataset(make_dataset, sampler, user_id_to_weight=weights)

    net = build_model(spec)
    load_numpy_state(net, initial)
    wrapper = _Net(net)
    model = PyTorchModel(
        model=wrapper,
        local_optimizer_create=functools.partial(torch.optim.SGD, momentum=local.momentum),
        central_optimizer=torch.optim.SGD(wrapper.parameters(), lr=1.0))

    class NoLocalEvalFedAvg(FederatedAveraging):  # type: ignore[misc]
        """pfl's FedAvg without the per-user evaluation before and after local training."""

        def get_next_central_contexts(self, *args: Any, **kwargs: Any) -> Any:
            contexts, model_, metrics = super().get_next_central_contexts(*args, **kwargs)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False)
                                 for c in contexts)
            return contexts, model_, metrics

    class Clock(TrainingProcessCallback):  # type: ignore[misc]
        def after_central_iteration(self, aggregate_metrics: Any, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Any]:
            clock.round_done()
            return False, Metrics()

    backend = SimulatedBackend(training_data=training_data, val_data=training_data,
                               postprocessors=[WeightByDatapoints()])
    algorithm_params = NNAlgorithmParams(central_num_iterations=len(schedule),
                                         evaluation_frequency=len(schedule) + 1,
                                         train_cohort_size=cohort, val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=local.epochs,
                                      local_learning_rate=local.learning_rate,
                                      local_batch_size=local.batch_size)
    clock.start()
    NoLocalEvalFedAvg().run(algorithm_params=algorithm_params, backend=backend, model=model,
                            model_train_params=train_params, callbacks=[Clock()],
                            send_metrics_to_platform=False)
    clock.stop()
    if world > 1:
        everyone: list[list[int]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(everyone, trained)
        trained = sorted(p for worker in everyone for p in worker)
    if trained != list(range(len(users))):
        raise RuntimeError(f"pfl trained {len(trained)} devices, not the schedule's "
                           f"{len(users)} in order")
    return state_to_numpy(net)


class _TimesClock:
    """Worker 0's round clock under torchrun: ``perf_counter`` readings, written to a file."""

    def __init__(self) -> None:
        self.started = 0.0
        self.ends: list[float] = []

    def start(self) -> None:
        self.started = time.perf_counter()

    def round_done(self) -> None:
        self.ends.append(time.perf_counter())

    def stop(self) -> None:
        pass


def run_pfl_distributed(*, workers: int, x: np.ndarray, y: np.ndarray, offsets: np.ndarray,
                        schedule: list[list[int]], seeds: list[list[int]], spec: ModelSpec,
                        local: LocalTraining, initial: dict[str, np.ndarray],
                        timeout_s: float | None = None
                        ) -> tuple[dict[str, np.ndarray], float, list[float]]:
    """:func:`run_pfl` on ``workers`` processes started by ``torchrun --standalone`` (each
    with one torch thread). Returns the final model and worker 0's clock: the
    ``perf_counter`` reading at ``algorithm.run`` and after each round.

    Raises:
        RuntimeError: torchrun failed (its output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="pfl-dist-") as tmp:
        d = Path(tmp)
        np.save(d / "x.npy", x)
        np.save(d / "y.npy", y)
        np.save(d / "offsets.npy", offsets)
        np.savez(d / "initial.npz", **initial)
        (d / "job.json").write_text(json.dumps({
            "schedule": schedule, "seeds": seeds,
            "spec": {"architecture": spec.architecture, "arguments": dict(spec.arguments)},
            "local": {"epochs": local.epochs, "batch_size": local.batch_size,
                      "learning_rate": local.learning_rate, "momentum": local.momentum}}))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PFL_PYTORCH_DEVICE": "cpu",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={workers}", str(Path(__file__).resolve()), "--worker", tmp]
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout_s)
        if done.returncode != 0 or not (d / "times.json").exists():
            tail = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise RuntimeError(f"torchrun exited {done.returncode}: {tail}")
        times = json.loads((d / "times.json").read_text())
        with np.load(d / "final.npz") as final:
            params = {k: final[k] for k in final.files}
    return params, times["start"], times["ends"]


def _worker(job_dir: str) -> None:
    """One torchrun worker: loads the job :func:`run_pfl_distributed` wrote and runs it."""
    torch.set_num_threads(1)
    d = Path(job_dir)
    job = json.loads((d / "job.json").read_text())
    with np.load(d / "initial.npz") as f:
        initial = {k: f[k] for k in f.files}
    clock = _TimesClock()
    params = run_pfl(x=np.load(d / "x.npy"), y=np.load(d / "y.npy"),
                     offsets=np.load(d / "offsets.npy"), schedule=job["schedule"],
                     seeds=job["seeds"], spec=ModelSpec(**job["spec"]),
                     local=LocalTraining(**job["local"]), initial=initial, clock=clock)
    if int(os.environ.get("RANK", "0")) == 0:
        np.savez(d / "final.npz", **params)
        (d / "times.json").write_text(json.dumps({"start": clock.started, "ends": clock.ends}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="a torchrun worker of run_pfl_distributed")
    ap.add_argument("--worker", required=True, help="the job directory")
    _worker(ap.parse_args().worker)
