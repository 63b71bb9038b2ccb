"""Registry of model architectures by name. Every model takes flat float features of size
``input_dim`` and returns class logits. No BatchNorm (DP-SGD later needs none)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ModelSpecError
from core.types import ModelSpec


@dataclass(frozen=True)
class _Arg:
    kind: str  # "pos_int" | "pos_int_list"
    default: Any = None
    required: bool = True


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, _Arg]]] = {}


def register_model(name: str, **args: _Arg) -> Callable[[Callable[..., nn.Module]],
                                                         Callable[..., nn.Module]]:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = (factory, args)
        return factory

    return deco


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def _check(arch: str, spec_args: Mapping[str, Any], schema: dict[str, _Arg]) -> dict[str, Any]:
    unknown = set(spec_args) - set(schema)
    if unknown:
        raise ModelSpecError(
            f"model.arguments.{sorted(unknown)[0]}: unknown argument for {arch!r} "
            f"(expected: {', '.join(sorted(schema))})"
        )
    out: dict[str, Any] = {}
    for name, arg in schema.items():
        if name not in spec_args:
            if arg.required:
                raise ModelSpecError(f"model.arguments.{name}: required by {arch!r}")
            out[name] = arg.default
            continue
        value = spec_args[name]
        if arg.kind == "pos_int":
            if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 1 << 20):
                raise ModelSpecError(
                    f"model.arguments.{name}: expected a positive integer, got {value!r}")
        elif arg.kind == "pos_int_list":
            if not (isinstance(value, list) and value and all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16
                    for v in value)):
                raise ModelSpecError(
                    f"model.arguments.{name}: expected a list of positive integers, got {value!r}")
        out[name] = value
    return out


def build_model(spec: ModelSpec) -> nn.Module:
    """Builds the registered architecture; ModelSpecError names the bad argument."""
    entry = _REGISTRY.get(spec.architecture)
    if entry is None:
        raise ModelSpecError(
            f"model.architecture: unknown architecture {spec.architecture!r} "
            f"(registered: {', '.join(model_names())})"
        )
    factory, schema = entry
    return factory(**_check(spec.architecture, spec.arguments, schema))


def initial_state(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Initial weights, deterministic in ``seed``; the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return state_to_numpy(build_model(spec))


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    own = model.state_dict()
    if list(own) != list(state) and set(own) != set(state):
        raise ModelSpecError(f"state has tensors {sorted(state)[:4]}..., model has "
                             f"{sorted(own)[:4]}...")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ModelSpecError(f"tensor {k!r}: shape {tuple(state[k].shape)} does not match "
                                 f"the model's {tuple(v.shape)}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(state[k], dtype=np.float32).copy())
                           for k in own})


@register_model("logistic_regression", input_dim=_Arg("pos_int"), num_classes=_Arg("pos_int"))
def _logistic_regression(input_dim: int, num_classes: int) -> nn.Module:
    return _Linear(input_dim, num_classes)


class _Linear(nn.Module):
    def __init__(self, input_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]


@register_model("mlp", input_dim=_Arg("pos_int"), hidden=_Arg("pos_int_list"),
                num_classes=_Arg("pos_int"))
def _mlp(input_dim: int, hidden: list[int], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model(
    "cnn",
    input_dim=_Arg("pos_int", 64, required=False),
    image_size=_Arg("pos_int", 8, required=False),
    in_channels=_Arg("pos_int", 1, required=False),
    channels=_Arg("pos_int_list", [16, 32], required=False),
    num_classes=_Arg("pos_int", 10, required=False),
)
def _cnn(input_dim: int, image_size: int, in_channels: int, channels: list[int],
         num_classes: int) -> nn.Module:
    if in_channels * image_size * image_size != input_dim:
        raise ModelSpecError(
            f"model.arguments.input_dim: {input_dim} != in_channels x image_size^2 "
            f"({in_channels} x {image_size}^2)")
    if len(channels) != 2:
        raise ModelSpecError("model.arguments.channels: expected two conv widths, e.g. [16, 32]")
    return _SmallCnn(image_size, in_channels, channels, num_classes)


class _SmallCnn(nn.Module):
    def __init__(self, image_size: int, in_channels: int, channels: list[int],
                 num_classes: int) -> None:
        super().__init__()
        self.shape = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        side = image_size // 2
        self.head = nn.Linear(channels[1] * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.shape)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.head(x.flatten(1))  # type: ignore[no-any-return]
