"""Local training and evaluation with torch, shared by device agents and simulations."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.types import LocalOptimizerKind, LocalTraining


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    loss: float
    steps: int


_OPTIMIZERS: dict[LocalOptimizerKind,
                  Callable[[Iterable[nn.Parameter], LocalTraining], torch.optim.Optimizer]] = {
    LocalOptimizerKind.SGD: lambda p, c: torch.optim.SGD(p, lr=c.learning_rate,
                                                         momentum=c.momentum),
    LocalOptimizerKind.ADAM: lambda p, c: torch.optim.Adam(p, lr=c.learning_rate),
}


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, config: LocalTraining, *,
                seed: int) -> TrainResult:
    """Trains ``model`` in place for ``config.epochs`` epochs of shuffled minibatches.

    Returns the example count (the update's FedAvg weight) and the mean loss of the last
    epoch. Raises ValueError on empty data.
    """
    if len(y) == 0:
        raise ValueError("no training data")
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ys = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    optimizer = _OPTIMIZERS[config.optimizer](model.parameters(), config)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    steps = 0
    last = 0.0
    for _ in range(config.epochs):
        order = torch.randperm(len(ys), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(ys), config.batch_size):
            idx = order[start:start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(xs[idx]), ys[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
        last = total / count
    return TrainResult(num_examples=len(ys), loss=last, steps=steps)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1024
             ) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on the data; ValueError on empty data."""
    if len(y) == 0:
        raise ValueError("no evaluation data")
    model.eval()
    xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    ys = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ys), batch_size):
            logits = model(xs[start:start + batch_size])
            target = ys[start:start + batch_size]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    return loss_sum / len(ys), correct / len(ys)
