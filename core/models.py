"""Registry of model architectures by name.

Built-in architectures take flat float32 features of size ``input_dim`` and return class
logits of shape ``[batch, num_classes]``. None uses BatchNorm: DP-SGD needs per-sample
gradients, which BatchNorm's cross-sample statistics break.

An architecture is a factory function registered with :func:`register_model` (the built-in
ones below) or brought by an engineer's app (:mod:`core.apps`: ``--app module:attribute`` or
a ``fedcoord.models`` entry point). Its keyword parameters *are* the schema of
``ModelSpec.arguments``: a parameter annotated ``int`` accepts a positive integer,
``float`` a finite number, ``bool`` true/false, ``str`` a string, ``Sequence[int]`` /
``Sequence[float]`` a list of them; an unannotated parameter accepts any plain value; a
parameter with a default is optional. :func:`build_model` checks the arguments against that
schema before anything is constructed, so a bad task file fails with a message naming the
field.

An architecture may carry two hooks (:class:`ModelHooks`): ``loss`` replaces cross-entropy
as the objective of local training, and ``metrics`` adds named metrics to evaluations.
"""

from __future__ import annotations

import inspect
import math
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import entry_points
from core.app_types import LossFn, MetricsFn, ModelFactory
from core.errors import ModelSpecError
from core.types import ModelSpec

#: Largest value accepted for any integer argument (a width, a dimension, a class count):
#: a typo such as ``hidden: [6400000]`` fails at validation, not as an out-of-memory error.
MAX_ARGUMENT = 1 << 20



@dataclass(frozen=True)
class ModelHooks:
    """What an architecture changes in training and evaluation; None keeps the default
    (cross-entropy on class logits; loss and accuracy only)."""

    loss: LossFn | None = None
    metrics: MetricsFn | None = None


@dataclass(frozen=True)
class _ArgumentKind:
    description: str
    check: Callable[[object], bool]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return _is_int(value) and 0 < typing.cast(int, value) <= MAX_ARGUMENT


def _is_number(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_plain(value: object) -> bool:
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


#: Annotation of a factory parameter -> how an argument for it is checked.
_ARGUMENT_KINDS: dict[object, _ArgumentKind] = {
    int: _ArgumentKind(f"a positive integer (at most {MAX_ARGUMENT})", _is_positive_int),
    float: _ArgumentKind("a finite number", _is_number),
    bool: _ArgumentKind("true or false", lambda v: isinstance(v, bool)),
    str: _ArgumentKind("a string", lambda v: isinstance(v, str)),
    Sequence[int]: _ArgumentKind(
        "a list of positive integers",
        lambda v: isinstance(v, list | tuple) and all(_is_positive_int(x) for x in v)),
    Sequence[float]: _ArgumentKind(
        "a list of finite numbers",
        lambda v: isinstance(v, list | tuple) and all(_is_number(x) for x in v)),
    inspect.Parameter.empty: _ArgumentKind("a plain value (number, string, list, mapping)",
                                           _is_plain),
    Any: _ArgumentKind("a plain value (number, string, list, mapping)", _is_plain),
}
_KNOWN_ANNOTATIONS = "int, float, bool, str, Sequence[int], Sequence[float] or none"


@dataclass(frozen=True)
class _Parameter:
    kind: _ArgumentKind
    required: bool


@dataclass(frozen=True)
class _Architecture:
    factory: ModelFactory
    parameters: Mapping[str, _Parameter]
    hooks: ModelHooks
    #: Where it came from ("built-in", "app custom_app:app", "entry point ..."), for messages.
    origin: str


_REGISTRY: dict[str, _Architecture] = {}


def register_model(name: str, *, loss: LossFn | None = None, metrics: MetricsFn | None = None,
                   origin: str = "built-in") -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a model factory under ``name``, with optional hooks.
    Registering the same factory object under the same name again does nothing (the first
    hooks stay).

    The factory's parameters must be keyword-compatible; their annotations say what the task
    file may give them (see the module docstring); defaults make them optional.

    Raises:
        ValueError: ``name`` is already registered.
        TypeError: a parameter has an annotation the argument checker does not know, or the
            factory takes ``*args``/``**kwargs``.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name].factory is factory:
            return factory  # the same app found twice (--app and its entry point): no-op
        if name in _REGISTRY:
            raise ValueError(f"model architecture {name!r} is already registered "
                             f"({_REGISTRY[name].origin})")
        _REGISTRY[name] = _architecture(name, factory, ModelHooks(loss, metrics), origin)
        return factory

    return decorate


def _architecture(name: str, factory: ModelFactory, hooks: ModelHooks, origin: str
                  ) -> _Architecture:
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    parameters: dict[str, _Parameter] = {}
    for param in inspect.signature(factory).parameters.values():
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD,
                          inspect.Parameter.POSITIONAL_ONLY):
            raise TypeError(f"{name}: parameter {param.name!r} must be passable by keyword "
                            f"(no *args, **kwargs or positional-only parameters)")
        annotation = hints.get(param.name, param.annotation)
        kind = _ARGUMENT_KINDS.get(annotation)
        if kind is None:
            raise TypeError(f"{name}: parameter {param.name!r} needs an annotation of "
                            f"{_KNOWN_ANNOTATIONS}, got {annotation!r}")
        parameters[param.name] = _Parameter(kind, param.default is inspect.Parameter.empty)
    return _Architecture(factory, parameters, hooks, origin)


def model_names() -> list[str]:
    """The registered architecture names (built-in, apps, installed entry points), sorted."""
    _discover()
    return sorted(_REGISTRY)


def model_hooks(architecture: str) -> ModelHooks:
    """The hooks of ``architecture`` (empty for the built-in ones and unknown names)."""
    found = _lookup(architecture)
    return found.hooks if found is not None else ModelHooks()


def _lookup(name: str) -> _Architecture | None:
    if name not in _REGISTRY:
        _discover()
    return _REGISTRY.get(name)


#: Models of installed apps that could not be registered (a name taken) -> why.
_refused: dict[str, str] = {}
_discovered = False


def _discover() -> None:
    """Registers the models of installed apps (:mod:`core.entry_points`), with their hooks,
    once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for found in entry_points.installed_apps():
        for name, factory in found.app.models.items():
            try:
                register_model(name, loss=found.app.loss, metrics=found.app.metrics,
                               origin=found.origin)(factory)
            except (ValueError, TypeError) as exc:
                _refused.setdefault(name, f"{found.origin}: {exc}")


#: Held while a model is constructed: construction draws its weights from torch's global RNG,
#: and :func:`initial_state`'s seeded draw must not share that stream with another thread's
#: (a coordinator builds a launch's model off its event loop while its commit thread may
#: build one for server-side evaluation). Re-entrant: initial_state holds it around
#: build_model.
_CONSTRUCTION = threading.RLock()


def build_model(spec: ModelSpec) -> nn.Module:
    """Builds the architecture ``spec`` names with its arguments, in training mode.

    The weights come from torch's global RNG, so construction is deterministic given
    ``torch.manual_seed`` (see :func:`initial_state` for a version that leaves the global RNG
    alone).

    Raises:
        ModelSpecError: unknown architecture, an argument that is unknown, missing, of the
            wrong type or out of range (the message names ``model.architecture`` or
            ``model.arguments.NAME``), or a user factory that raises or returns something
            that is not an ``nn.Module``.
    """
    architecture = _lookup(spec.architecture)
    if architecture is None:
        why = _refused.get(spec.architecture) or entry_points.broken(spec.architecture)
        if why is not None:
            raise ModelSpecError(f"model.architecture: {why}")
        raise ModelSpecError(
            f"model.architecture: unknown architecture {spec.architecture!r} "
            f"(registered: {', '.join(model_names())}; user models come from "
            f"--app module:attribute or an installed 'fedcoord.models' entry point)"
        )
    arguments = _checked_arguments(spec, architecture)
    with _CONSTRUCTION:
        return _construct(spec, architecture, arguments)


def _construct(spec: ModelSpec, architecture: _Architecture, arguments: Mapping[str, Any]
               ) -> nn.Module:
    """The factory's call (under :data:`_CONSTRUCTION`) and the check of what it returned."""
    if architecture.origin == "built-in":
        return architecture.factory(**arguments)
    try:
        model = architecture.factory(**arguments)
    except ModelSpecError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"model: {spec.architecture!r} ({architecture.origin}) failed to "
                             f"build: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model: {spec.architecture!r} ({architecture.origin}) returned "
                             f"{type(model).__name__}, not a torch.nn.Module")
    return model


def _checked_arguments(spec: ModelSpec, architecture: _Architecture) -> dict[str, Any]:
    for name in spec.arguments:
        if name not in architecture.parameters:
            raise ModelSpecError(
                f"model.arguments.{name}: unknown argument for {spec.architecture!r} "
                f"(expected: {', '.join(architecture.parameters) or 'none'})"
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

    Deterministic in (spec, seed), whatever other threads build meanwhile: the seeded draw
    holds :data:`_CONSTRUCTION`, which every :func:`build_model` takes; the global torch RNG
    is forked, so callers' random streams are untouched.

    Raises:
        ModelSpecError: as :func:`build_model`.
    """
    with _CONSTRUCTION, torch.random.fork_rng(devices=[]):
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


def load_model(task: ModelSpec | Any, path: str | Path) -> nn.Module:
    """The model a task trains, with the weights of a file ``fedctl model pull`` wrote, in
    eval mode: ``load_model("task.yaml", "model.safetensors")``.

    ``task`` is a task file path, a :class:`~core.types.TaskSpec` or a
    :class:`~core.types.ModelSpec`. A user model needs its app loaded first
    (:func:`core.apps.load_app`) unless it is an installed entry point.

    Raises:
        TaskSpecError: ``task`` is a file that is not a valid task file.
        ModelSpecError: the model cannot be built, or the weights do not fit it.
        TensorFormatError: ``path`` is not a safetensors file.
        OSError: ``path`` cannot be read.
    """
    from core.tensors import load_safetensors
    from core.types import TaskSpec

    if isinstance(task, str | Path):
        from core.taskspec import load_task_file

        task = load_task_file(task)
    spec = task.model if isinstance(task, TaskSpec) else task
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"expected a task file, TaskSpec or ModelSpec, got {type(task).__name__}")
    model = build_model(spec)
    load_numpy_state(model, load_safetensors(Path(path).read_bytes()))
    return model.eval()


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
