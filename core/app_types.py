"""What an engineer's app is made of (:class:`App`) and the shape of each piece; the
registries (:mod:`core.models`, :mod:`core.data.spec`) and the loaders (:mod:`core.apps`,
:mod:`core.entry_points`) all speak these types."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.data.dataset import LocalDataset
from core.data.params import DataParams

if TYPE_CHECKING:  # torch only for the annotations: parsing a data spec stays light
    import torch
    from torch import nn

#: ``factory(**model.arguments) -> nn.Module``; its annotated keyword parameters are the
#: schema of the task's ``model.arguments`` (:mod:`core.models`).
ModelFactory = Callable[..., "nn.Module"]
#: ``loss(model, x_batch, y_batch)``: the batch's mean loss, a scalar tensor with a graph.
LossFn = Callable[["nn.Module", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
#: ``metrics(model, x, y)``: named metrics of the model on the data (under ``no_grad``).
MetricsFn = Callable[["nn.Module", "torch.Tensor", "torch.Tensor"], Mapping[str, float]]
#: ``source(params) -> LocalDataset``: one device's data from its data spec's fields.
DataSource = Callable[[DataParams], LocalDataset]


@dataclass(frozen=True)
class App:
    """One engineer's package of user code. ``loss`` and ``metrics`` apply to the app's own
    models."""

    models: Mapping[str, ModelFactory] = field(default_factory=dict)
    data: Mapping[str, DataSource] = field(default_factory=dict)
    loss: LossFn | None = None
    metrics: MetricsFn | None = None
