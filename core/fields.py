"""Plain data (parsed YAML, stored JSON) -> frozen dataclasses, driven by their fields.

One builder for every configuration file: task files (:mod:`core.taskspec`) and simulation
files (:mod:`simulations.config`). Unknown keys are errors (a typo must never fall back to a
default silently); ``X | None`` fields take null or ``"auto"`` (and ``"off"`` for a section)
as None. Errors carry the dotted path of the field, which callers turn into their own error
naming the file.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from core.errors import CoreError

#: Types with a parser of their own: ``hook(value, path)`` returns the built value.
Hooks = Mapping[Any, Callable[[Any, str], Any]]


class FieldError(CoreError):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path or 'top level'}: {message}")


def build(tp: Any, value: Any, path: str = "", *, hooks: Hooks | None = None,
          skip: frozenset[str] = frozenset()) -> Any:
    """Converts ``value`` to ``tp``; FieldError at the first mismatch. Dataclass fields named
    in ``skip`` are never read from the data (they keep their defaults)."""
    hooks = hooks or {}
    if tp in hooks:
        return hooks[tp](value, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise FieldError(path, f"expected a mapping, got {describe(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.name not in skip}
        for key in value:
            if key not in fields:
                raise FieldError(join(path, str(key)),
                                 f"unknown field (expected one of: {', '.join(sorted(fields))})")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            sub = join(path, name)
            if name in value:
                kwargs[name] = build(hints[name], value[name], sub, hooks=hooks, skip=skip)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldError(sub, "is required")
        return tp(**kwargs)
    if typing.get_origin(tp) in (Mapping, dict) or tp is Mapping:
        if not isinstance(value, Mapping):
            raise FieldError(path, f"expected a mapping, got {describe(value)}")
        if not all(isinstance(k, str) for k in value):
            raise FieldError(path, "keys must be strings")
        return dict(value)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported field type {tp}: only tuple[X, ...]")
        if not isinstance(value, list | tuple):
            raise FieldError(path, f"expected a list, got {describe(value)}")
        return tuple(build(args[0], item, f"{path}[{i}]", hooks=hooks, skip=skip)
                     for i, item in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member:
                return member
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise FieldError(path, f"must be finite, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported field type {tp}")
        if value is None or value == "auto" or (
                value == "off" and dataclasses.is_dataclass(options[0])):
            return None
        return build(options[0], value, path, hooks=hooks, skip=skip)
    raise FieldError(path, f"expected {type_name(tp)}, got {describe(value)}")


def plain(value: Any, *, hooks: Mapping[type, Callable[[Any], Any]] | None = None) -> Any:
    """The inverse: JSON/YAML-ready data (enums by value, dataclasses as mappings)."""
    hooks = hooks or {}
    for cls, hook in hooks.items():
        if isinstance(value, cls):
            return hook(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), hooks=hooks)
                for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): plain(v, hooks=hooks) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, hooks=hooks) for v in value]
    return value


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a mapping")


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
