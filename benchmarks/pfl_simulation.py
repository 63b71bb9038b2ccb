"""Apple's pfl (pfl-research 0.6) simulation on :mod:`benchmarks.simulation`'s workload.

pfl's own simulation machinery, in this process (the benchmark runs it in a child process
group with a hard timeout); single process, no Horovod / torch.distributed workers:

* model: :class:`pfl.model.pytorch.PyTorchModel` around the same torch model
  (:func:`core.models.build_model`, initial weights ``initial``), with a fresh
  ``torch.optim.SGD`` (lr and momentum of ``local``) per device and ``torch.optim.SGD(lr=1)``
  as the central optimizer, so the server step is ``global += weighted mean delta``.
* data: :class:`pfl.data.federated_dataset.FederatedDataset` whose user sampler yields the
  schedule's (device, seed) pairs in order, so round ``r``'s cohort of
  ``len(schedule[r-1])`` users is exactly ``schedule[r-1]`` (checked after the run).
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
``algorithm.run``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
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
    """Runs ``len(schedule)`` pfl central iterations; ``clock.start()`` just before
    ``algorithm.run``, ``clock.round_done()`` after each central model update. Returns the
    final global model.

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
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    if local.optimizer is not LocalOptimizerKind.SGD:
        raise ValueError(f"the pfl runner trains with SGD, got {local.optimizer.value!r}")
    sizes = {len(devices) for devices in schedule}
    if len(sizes) != 1:
        raise ValueError(f"pfl needs one cohort size, the schedule has {sorted(sizes)}")
    cohort = sizes.pop()

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    trained: list[int] = []  # devices in the order pfl built their datasets

    def make_dataset(user: tuple[int, int]) -> Dataset:
        device, seed = user
        lo, hi = int(offsets[device]), int(offsets[device + 1])
        order = torch.randperm(hi - lo, generator=torch.Generator().manual_seed(seed)) + lo
        trained.append(device)
        return Dataset((xt[order], yt[order]), user_id=str(device))

    pairs = iter([(d, s) for devices, round_seeds in zip(schedule, seeds, strict=True)
                  for d, s in zip(devices, round_seeds, strict=True)])
    training_data = FederatedDataset(make_dataset, functools.partial(next, pairs))

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
    expected = [d for devices in schedule for d in devices]
    if trained != expected:
        raise RuntimeError(f"pfl trained {len(trained)} devices, not the schedule's "
                           f"{len(expected)} in order")
    return state_to_numpy(net)
