"""Local training and evaluation with torch, shared by device agents and simulations.

Nothing global is changed: no torch RNG seeding (shuffling uses its own generator), no
thread or grad-mode settings that outlive a call. The model's train/eval mode is restored
on return. Not thread-safe per model; different models may train on different threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.app_types import LossFn, MetricsFn
from core.types import LocalOptimizerKind, LocalTraining


@dataclass(frozen=True)
class TrainResult:
    """``num_examples``: training examples (the update's FedAvg weight); ``loss``: mean
    cross-entropy (nats per example) over the last epoch; ``steps``: optimizer steps taken."""

    num_examples: int
    loss: float
    steps: int


_OptimizerFactory = Callable[[Iterator[nn.Parameter], LocalTraining], torch.optim.Optimizer]

_OPTIMIZERS: dict[LocalOptimizerKind, _OptimizerFactory] = {
    LocalOptimizerKind.SGD: lambda params, c: torch.optim.SGD(
        params, lr=c.learning_rate, momentum=c.momentum),
    LocalOptimizerKind.ADAM: lambda params, c: torch.optim.Adam(params, lr=c.learning_rate),
}


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, config: LocalTraining, *,
                seed: int, loss: LossFn | None = None) -> TrainResult:
    """Trains ``model`` in place: ``config.epochs`` passes over minibatches of
    ``config.batch_size`` (the last one may be smaller), reshuffled each epoch by a
    ``torch.Generator`` seeded with ``seed``, minimising cross-entropy with the configured
    optimizer (a fresh one per call: optimizer state does not carry over between rounds).
    ``loss`` (an app's hook, see :mod:`core.apps`) replaces cross-entropy: it gets the model
    and one minibatch and returns the batch's mean loss.

    ``x`` is ``[n, features]`` (cast to float32), ``y`` ``[n]`` class indices.

    Raises:
        ValueError: no data, ``x`` and ``y`` of different lengths, or ``epochs`` /
            ``batch_size`` below 1.
    """
    features, labels = as_tensors(x, y, "training")
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {config.epochs} "
                         f"and {config.batch_size}")
    objective = loss
    generator = torch.Generator().manual_seed(seed)
    optimizer = _OPTIMIZERS[config.optimizer](model.parameters(), config)
    n = len(labels)
    was_training = model.training
    model.train()
    steps = 0
    epoch_loss = torch.zeros((), dtype=torch.float64)
    try:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator)
            epoch_loss = torch.zeros((), dtype=torch.float64)
            for batch in torch.split(order, config.batch_size):
                optimizer.zero_grad(set_to_none=True)
                batch_loss = (objective(model, features[batch], labels[batch]) if objective
                              else nn.functional.cross_entropy(model(features[batch]),
                                                               labels[batch]))
                torch.autograd.backward(batch_loss)
                optimizer.step()
                # Summed as a tensor: no per-step synchronisation through float().
                epoch_loss += batch_loss.detach().double() * len(batch)
                steps += 1
    finally:
        model.train(was_training)
    return TrainResult(num_examples=n, loss=float(epoch_loss) / n, steps=steps)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024,
             loss: LossFn | None = None) -> tuple[float, float]:
    """(mean loss per example, accuracy in [0, 1]) of ``model`` on the data, under
    ``torch.no_grad`` and in eval mode. The loss is cross-entropy in nats, or the app's
    ``loss`` hook when given; accuracy is the argmax of 2-D outputs (0 for other outputs).

    Raises:
        ValueError: no data, ``x`` and ``y`` of different lengths, or ``batch_size`` < 1.
    """
    features, labels = as_tensors(x, y, "evaluation")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    correct = torch.zeros((), dtype=torch.int64)
    try:
        with torch.no_grad():
            batches = zip(torch.split(features, batch_size), torch.split(labels, batch_size),
                          strict=True)
            for xb, yb in batches:
                logits = model(xb)
                if loss is None:
                    loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
                else:
                    loss_sum += loss(model, xb, yb).double() * len(yb)
                if logits.ndim == 2:
                    correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    n = len(labels)
    return float(loss_sum) / n, int(correct) / n


def evaluate_metrics(model: nn.Module, x: np.ndarray, y: np.ndarray, metrics: MetricsFn
                     ) -> dict[str, float]:
    """An app's metrics of ``model`` on the data, under ``torch.no_grad`` and in eval mode.

    Raises:
        ValueError: no data, or the hook returned a name that is not a string or a value
            that is not a finite number (the message names it).
    """
    features, labels = as_tensors(x, y, "evaluation")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = metrics(model, features, labels)
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for name, value in dict(raw).items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not isinstance(name, str) or not name or not np.isfinite(number):
            raise ValueError(f"metrics hook returned {name!r}: {value!r}; expected a "
                             f"non-empty name and a finite number")
        out[name] = number
    return out


def as_tensors(x: np.ndarray, y: np.ndarray, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float32 and ``y`` as int64 tensors, sharing memory where the arrays already
    fit.

    Raises:
        ValueError: no data (``what`` names it: "training", "evaluation"), or ``x`` and
            ``y`` of different lengths.
    """
    if len(y) == 0:
        raise ValueError(f"no {what} data")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} feature rows but {len(y)} labels")
    return _as_tensor(x, np.float32), _as_tensor(y, np.int64)


def _as_tensor(values: np.ndarray, dtype: type[np.generic]) -> torch.Tensor:
    """Shares memory with ``values`` when it already fits; copies read-only arrays, which
    torch would otherwise warn about."""
    array = np.ascontiguousarray(values, dtype=dtype)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)
