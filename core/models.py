"""Registry of model architectures by name.

Every model takes flat float32 features of size ``input_dim`` and returns class logits of
shape ``[batch, num_classes]``. None uses BatchNorm: DP-SGD needs per-sample gradients, which
BatchNorm's cross-sample statistics break.

An architecture is a factory function registered with :func:`register_model`. Its keyword
parameters *are* the schema of ``ModelSpec.arguments``: ``int`` parameters accept a positive
integer, ``Sequence[int]`` parameters a list of positive integers, and parameters with a
default are optional. :func:`build_model` checks the arguments against that schema before
anything is constructed, so a bad task file fails with a message naming the field.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ModelSpecError
from core.types import ModelSpec

#: Largest value accepted for any integer argument (a width, a dimension, a class count):
#: a typo such as ``hidden: [6400000]`` fails at validation, not as an out-of-memory error.
MAX_ARGUMENT = 1 << 20

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _ArgumentKind:
    description: str
    check: Callable[[object], bool]


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ARGUMENT


def _is_positive_int_list(value: object) -> bool:
    return isinstance(value, list | tuple) and all(_is_positive_int(v) for v in value)


#: Annotation of a factory parameter -> how an argument for it is checked.
_ARGUMENT_KINDS: dict[object, _ArgumentKind] = {
    int: _ArgumentKind(f"a positive integer (at most {MAX_ARGUMENT})", _is_positive_int),
    Sequence[int]: _ArgumentKind("a list of positive integers", _is_positive_int_list),
}


@dataclass(frozen=True)
class _Parameter:
    kind: _ArgumentKind
    required: bool


@dataclass(frozen=True)
class _Architecture:
    factory: ModelFactory
    parameters: Mapping[str, _Parameter]


_REGISTRY: dict[str, _Architecture] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under ``name``.

    The factory's parameters must be keyword-compatible and annotated ``int`` or
    ``Sequence[int]``; defaults make them optional.

    Raises:
        ValueError: ``name`` is already registered.
        TypeError: a parameter has an annotation the argument checker does not know.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model architecture {name!r} is already registered")
        hints = typing.get_type_hints(factory)
        parameters: dict[str, _Parameter] = {}
        for param in inspect.signature(factory).parameters.values():
            kind = _ARGUMENT_KINDS.get(hints.get(param.name))
            if kind is None:
                raise TypeError(f"{name}: parameter {param.name!r} needs an int or "
                                f"Sequence[int] annotation")
            parameters[param.name] = _Parameter(kind, param.default is inspect.Parameter.empty)
        _REGISTRY[name] = _Architecture(factory, parameters)
        return factory

    return decorate


def model_names() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def build_model(spec: ModelSpec) -> nn.Module:
    """Builds the architecture ``spec`` names with its arguments, in training mode.

    The weights come from torch's global RNG, so construction is deterministic given
    ``torch.manual_seed`` (see :func:`initial_state` for a version that leaves the global RNG
    alone).

    Raises:
        ModelSpecError: unknown architecture, or an argument that is unknown, missing, of the
            wrong type or out of range; the message names ``model.architecture`` or
            ``model.arguments.NAME``.
    """
    architecture = _REGISTRY.get(spec.architecture)
    if architecture is None:
        raise ModelSpecError(
            f"model.architecture: unknown architecture {spec.architecture!r} "
            f"(registered: {', '.join(model_names())})"
        )
    return architecture.factory(**_checked_arguments(spec, architecture))


def _checked_arguments(spec: ModelSpec, architecture: _Architecture) -> dict[str, Any]:
    for name in spec.arguments:
        if name not in architecture.parameters:
            raise ModelSpecError(
                f"model.arguments.{name}: unknown argument for {spec.architecture!r} "
                f"(expected: {', '.join(architecture.parameters)})"
            )
    arguments: dict[str, Any] = {}
    for name, parameter in architecture.parameters.items():
        if name not in spec.arguments:
            if parameter.required:
                raise ModelSpecError(
                    f"model.arguments.{name}: required by {spec.architecture!r}, "
                    f"expected {parameter.kind.description}"
                )
            continue
        value = spec.arguments[name]
        if not parameter.kind.check(value):
            raise ModelSpecError(
                f"model.arguments.{name}: expected {parameter.kind.description}, got {value!r}"
            )
        arguments[name] = list(value) if isinstance(value, list | tuple) else value
    return arguments


def initial_state(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """The initial weights of ``spec``'s model, as :func:`state_to_numpy` returns them.

    Deterministic in (spec, seed); the global torch RNG is forked, so callers' random
    streams are untouched.

    Raises:
        ModelSpecError: as :func:`build_model`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return state_to_numpy(build_model(spec))


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """float32 copies of ``model.state_dict()``, in its order."""
    return {name: value.detach().cpu().numpy().astype(np.float32, copy=True)
            for name, value in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copies ``state`` (any order, converted to float32) into ``model``'s tensors.

    Raises:
        ModelSpecError: ``state`` lacks a tensor of the model, has one the model lacks, or a
            shape differs; nothing is loaded then.
    """
    own = model.state_dict()
    missing = [name for name in own if name not in state]
    unexpected = [name for name in state if name not in own]
    if missing or unexpected:
        raise ModelSpecError(
            f"weights do not fit the model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}"
        )
    for name, tensor in own.items():
        shape = tuple(np.shape(state[name]))
        if shape != tuple(tensor.shape):
            raise ModelSpecError(
                f"weights do not fit the model: tensor {name!r} has shape {shape}, "
                f"the model's has {tuple(tensor.shape)}"
            )
    model.load_state_dict(
        {name: torch.from_numpy(np.array(state[name], dtype=np.float32, copy=True))
         for name in own}
    )


# -- architectures --------------------------------------------------------------------------

@register_model("logistic_regression")
def _logistic_regression(input_dim: int, num_classes: int) -> nn.Module:
    return _Linear(input_dim, num_classes)


class _Linear(nn.Module):
    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]


@register_model("mlp")
def _mlp(input_dim: int, hidden: Sequence[int], num_classes: int) -> nn.Module:
    """Linear layers of widths ``hidden`` with ReLU between them; ``hidden=[]`` is a
    logistic regression."""
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn")
def _cnn(input_dim: int = 64, image_size: int = 8, in_channels: int = 1,
         channels: Sequence[int] = (16, 32), num_classes: int = 10) -> nn.Module:
    """conv3x3(channels[0]) - ReLU - conv3x3(channels[1]) - ReLU - maxpool2x2 - linear, on
    the flat input reshaped to ``[N, in_channels, image_size, image_size]``."""
    if input_dim != in_channels * image_size * image_size:
        raise ModelSpecError(
            f"model.arguments.input_dim: {input_dim} must equal in_channels x image_size^2 "
            f"= {in_channels} x {image_size}^2 = {in_channels * image_size * image_size}"
        )
    if image_size < 2:
        raise ModelSpecError(
            f"model.arguments.image_size: at least 2 for the 2x2 pooling, got {image_size}"
        )
    if len(channels) != 2:
        raise ModelSpecError(
            f"model.arguments.channels: expected two conv widths, e.g. [16, 32], "
            f"got {list(channels)!r}"
        )
    return _SmallCnn(image_size, in_channels, (channels[0], channels[1]), num_classes)


class _SmallCnn(nn.Module):
    def __init__(self, image_size: int, in_channels: int, channels: tuple[int, int],
                 num_classes: int) -> None:
        super().__init__()
        self.image_shape = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 2
        self.head = nn.Linear(channels[1] * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.image_shape)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))  # type: ignore[no-any-return]
