"""Whether a model fits a data schema: one forward pass on a batch of one zero example must
give ``[1, num_classes]`` outputs. The coordinator runs it at launch (on the declared and the
reported schemas), and a device before it trains (on its own data's), so both describe a
misfit the same way. torch is imported when a check runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.types import DataSchema

if TYPE_CHECKING:
    from torch import nn

#: Largest example (in values) a check builds: a schema is user or device input, and its
#: dimensions multiply (8 of up to 2^20 each).
MAX_CHECK_VALUES = 1 << 24
#: Characters of an exception's message a problem shows.
_MESSAGE_CHARS = 300


def fit_problem(model: nn.Module, schema: DataSchema) -> str | None:
    """What goes wrong when ``model`` runs on one example of ``schema`` (zeros, in eval mode,
    without gradients; the model's mode is restored), or None when it gives
    ``[1, schema.num_classes]`` outputs. Any exception of the model's code is described, never
    raised."""
    import torch

    batch = [1, *schema.feature_shape]
    values = 1
    for d in schema.feature_shape:
        values *= d
    if values > MAX_CHECK_VALUES:
        return (f"an example of shape {list(schema.feature_shape)} has {values} values, over "
                f"the {MAX_CHECK_VALUES} a check runs")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(batch, dtype=torch.float32))
    except Exception as exc:  # noqa: BLE001 - user code: any error is the answer
        message = " ".join(str(exc).split())
        if len(message) > _MESSAGE_CHARS:
            message = message[:_MESSAGE_CHARS - 3] + "..."
        hint = first_layer(model)
        return (f"a batch of shape {batch} raised {type(exc).__name__}: {message}"
                + (f" ({hint})" if hint else ""))
    finally:
        model.train(was_training)
    expected = [1, schema.num_classes]
    if not isinstance(out, torch.Tensor):
        return f"a batch of shape {batch} gave a {type(out).__name__}, not a tensor {expected}"
    if list(out.shape) != expected:
        shape = list(out.shape) if out.ndim <= 8 else f"{out.ndim} dimensions"
        return (f"a batch of shape {batch} gave outputs of shape {shape}, not {expected} "
                f"({schema.num_classes} classes)")
    return None


def first_layer(model: nn.Module) -> str:
    """What the model's first layer with weights takes (``its first layer, Linear, takes 60
    features``), when it is a linear or convolution layer; "" otherwise."""
    from torch import nn

    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        if isinstance(module, nn.Linear):
            return f"its first layer, Linear, takes {module.in_features} features"
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            return (f"its first layer, {type(module).__name__}, takes {module.in_channels} "
                    f"channels")
        return ""
    return ""
