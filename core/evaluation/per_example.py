"""A model's value of each per-example metric (:data:`core.evaluation.plan.
PER_EXAMPLE_METRICS`) on every example: what a device sketches where the plan asks
(:class:`core.evaluation.plan.SketchPlan`). Used by the device agent and by simulations;
torch is imported here, when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from core.evaluation.plan import PER_EXAMPLE_METRICS

if TYPE_CHECKING:
    from torch import nn

    from core.app_types import LossFn, MetricsFn
    from core.evaluation.plan import EvaluationPlan
    from core.evaluation.report import DeviceResult


def per_example_values(model: nn.Module, x: np.ndarray, y: np.ndarray,
                       metrics: Sequence[str], *, loss: LossFn | None = None,
                       batch_size: int = 1024) -> dict[str, npt.NDArray[np.float64]]:
    """Each of ``metrics``' value on every example, under ``torch.no_grad`` and in eval
    mode: ``loss`` is cross-entropy in nats (the app's ``loss`` hook when given, called on
    one example at a time: a hook returns the mean over its batch, so a batch of one is
    that example's loss; n forward passes), ``accuracy`` is 1 where the argmax of 2-D
    outputs is the label (0 for other outputs), as :func:`core.training.evaluate` counts.

    Raises:
        ValueError: a metric without per-example values, no data, or ``x`` and ``y`` of
            different lengths.
    """
    import torch
    from torch import nn

    from core.training import as_tensors

    unknown = [m for m in metrics if m not in PER_EXAMPLE_METRICS]
    if unknown:
        raise ValueError(f"metric {unknown[0]!r} has no per-example values (only "
                         f"{', '.join(PER_EXAMPLE_METRICS)})")
    features, labels = as_tensors(x, y, "evaluation")
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    correct: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for xb, yb in zip(torch.split(features, batch_size), torch.split(labels, batch_size),
                              strict=True):
                logits = model(xb)
                if "loss" in metrics:
                    if loss is None:
                        losses.append(nn.functional.cross_entropy(logits, yb, reduction="none"))
                    else:
                        losses.append(torch.stack([loss(model, xb[i:i + 1], yb[i:i + 1])
                                                   for i in range(len(yb))]))
                if "accuracy" in metrics:
                    hit = (logits.argmax(dim=1) == yb) if logits.ndim == 2 else (
                        torch.zeros(len(yb), dtype=torch.bool))
                    correct.append(hit)
    finally:
        model.train(was_training)
    out: dict[str, npt.NDArray[np.float64]] = {}
    if "loss" in metrics:
        out["loss"] = torch.cat(losses).double().reshape(-1).numpy()
    if "accuracy" in metrics:
        out["accuracy"] = torch.cat(correct).double().numpy()
    return out


def device_result(model: nn.Module, x: np.ndarray, y: np.ndarray, plan: EvaluationPlan, *,
                  loss: LossFn | None = None, metrics: MetricsFn | None = None
                  ) -> DeviceResult:
    """One model version's evaluation on a device's examples, as a device reports it: the
    loss (``loss``: the app's hook, else cross-entropy) and accuracy, the metrics ``plan``
    declares (the app's ``metrics`` hook), and each example's values of the metrics the
    plan sketches. The device agent and the simulations both call this.

    Raises:
        ValueError: the plan declares a metric the hook does not return (or there is no
            hook).
    """
    from core.evaluation.report import DeviceResult
    from core.training import evaluate, evaluate_metrics

    mean_loss, accuracy = evaluate(model, x, y, loss=loss)
    values = {"loss": mean_loss, "accuracy": accuracy}
    if plan.declared:
        if metrics is None:
            raise ValueError(f"the task declares metrics {', '.join(plan.declared)}, but the "
                             f"model has no metrics hook")
        app = evaluate_metrics(model, x, y, metrics)
        missing = [name for name in plan.declared if name not in app]
        if missing:
            raise ValueError(f"the model's metrics hook returned no {missing[0]!r}, which the "
                             f"task declares")
        values.update({name: app[name] for name in plan.declared})
    per_example = (per_example_values(model, x, y, plan.sketch.metrics, loss=loss)
                   if plan.sketch is not None else {})
    return DeviceResult(len(y), values, per_example)
