"""The model, its training objective and its metric."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def tabular_net(input_dim: int, num_classes: int, hidden: Sequence[int] = (32,),
                activation: str = "gelu", label_smoothing: float = 0.0) -> nn.Module:
    """An MLP over standardised tabular features. The annotations are the schema fedcoord
    checks the task file's ``model.arguments`` against. (``label_smoothing`` is read by the
    loss through the model.)"""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    model.label_smoothing = label_smoothing  # type: ignore[assignment]
    return model


_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def label_smoothed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The local training step's objective: cross-entropy with the model's label smoothing."""
    smoothing = float(getattr(model, "label_smoothing", 0.0))
    return nn.functional.cross_entropy(model(x), y, label_smoothing=smoothing)


def macro_f1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Macro-averaged F1 over the classes present in ``y`` or predicted."""
    predicted = model(x).argmax(dim=1)
    scores = []
    for c in torch.unique(torch.cat([y, predicted])):
        tp = ((predicted == c) & (y == c)).sum().item()
        fp = ((predicted == c) & (y != c)).sum().item()
        fn = ((predicted != c) & (y == c)).sum().item()
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"macro_f1": sum(scores) / len(scores)}
