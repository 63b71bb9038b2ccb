"""Study files: YAML -> :class:`StudySpec`, checked when loaded, with errors that name the
file and the field (``study.yaml: field 'space.local.learning_rate.low': must be positive``).

A study file names a base task file (the one ``fedctl simulate`` and ``fedctl task launch``
take) and a search space over its fields::

    name: tune-digits
    task: digits_fedavg.yaml      # relative to this file; or the task itself, inline
    rounds: 8                     # optional: replaces the task's rounds in every trial
    trials: 12
    parallel: 2                   # trials run at once (processes; coordinator: tasks)
    seed: 0                       # the sampler's; every trial keeps the task's own seed
    baseline: true                # trial 0 runs the task's own values (each inside its range)
    objective: {metric: accuracy, direction: maximize}   # accuracy | loss | an app's metric
    sampler: {kind: tpe, startup_trials: 4}              # tpe | random
    pruner: {kind: median, startup_trials: 3, warmup_rounds: 2}   # median | none
    space:                        # task-file fields, dotted as in error messages
      local.learning_rate: {type: float, low: 0.005, high: 0.5, log: true}
      local.epochs: {type: int, low: 1, high: 4}
      local.batch_size: {type: categorical, choices: [8, 16, 32]}
      server.learning_rate: {type: float, low: 0.5, high: 1.5}
      simulation.algorithm.mu: {type: float, low: 0.0, high: 1.0}   # with kind: fedprox

The objective is the metric of the trial's final evaluated model (the model the trial would
ship); each evaluated round's value is the curve the pruner reads. ``direction`` defaults to
``minimize`` for ``loss`` and ``maximize`` otherwise.

What is checked at load, beyond types: the base task is valid as it stands, and stays valid
with every parameter at its ``low`` and ``high`` (or each of its ``choices``), so a range
that makes the task invalid (``simulation.algorithm.mu`` without ``kind: fedprox``, a batch
size of 0, a field that does not exist) is refused before any trial runs, naming
``space.PATH``.
"""

from __future__ import annotations

import copy
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core import fields
from simulations.config import SimulationConfig, config_from_dict, read_task_file
from simulations.errors import SimulationConfigError


class Direction(enum.Enum):
    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


class ParamKind(enum.Enum):
    FLOAT = "float"              # low..high, optionally log-uniform or on a step grid
    INT = "int"                  # low..high inclusive, optionally log or on a step grid
    CATEGORICAL = "categorical"  # one of choices


class SamplerKind(enum.Enum):
    TPE = "tpe"        # Optuna's tree-structured Parzen estimator (random for startup_trials)
    RANDOM = "random"


class PrunerKind(enum.Enum):
    MEDIAN = "median"  # stop a trial whose value at a round is worse than the median of
                       # finished trials at that round
    NONE = "none"


#: A categorical choice: what a task-file field can hold.
Choice = bool | int | float | str


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: the task-file field at ``path`` (dotted)."""

    path: str
    kind: ParamKind
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Choice, ...] = ()

    def corners(self) -> tuple[Choice, ...]:
        """The values load-time checks try: the ends of the range, or every choice."""
        if self.kind is ParamKind.CATEGORICAL:
            return self.choices
        if self.kind is ParamKind.INT:
            return (int(self.low), int(self.high))
        return (self.low, self.high)


@dataclass(frozen=True)
class Objective:
    metric: str = "accuracy"
    direction: Direction = Direction.MAXIMIZE


@dataclass(frozen=True)
class SamplerSpec:
    kind: SamplerKind = SamplerKind.TPE
    #: Trials sampled at random before TPE models the results.
    startup_trials: int = 4


@dataclass(frozen=True)
class PrunerSpec:
    """``startup_trials``: finished trials needed before any trial is pruned;
    ``warmup_rounds``: rounds a trial runs before it can be pruned."""

    kind: PrunerKind = PrunerKind.MEDIAN
    startup_trials: int = 3
    warmup_rounds: int = 2


@dataclass(frozen=True)
class StudySpec:
    """A study file, checked. ``task``: the base task as parsed YAML (what a trial's
    overrides are applied to); ``task_source``: the file it came from (the study file for an
    inline task); ``base_dir``: where the task's relative paths resolve."""

    name: str
    task: Mapping[str, Any]
    task_source: str
    base_dir: str
    space: tuple[Param, ...]
    objective: Objective
    trials: int
    parallel: int
    seed: int
    rounds: int | None = None
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    source: str = "<study>"
    #: Trial 0 runs the base task's own values (``baseline: true``): path -> value.
    baseline: Mapping[str, Choice] | None = None

    def trial_task(self, params: Mapping[str, Any], *, name: str | None = None
                   ) -> dict[str, Any]:
        """The base task with ``params`` (path -> value) written in, the study's ``rounds``
        and, when given, ``name``: a task file's data, for a simulation or a coordinator."""
        task = copy.deepcopy(dict(self.task))
        if self.rounds is not None:
            task["rounds"] = self.rounds
        if name is not None:
            task["name"] = name
        for path, value in params.items():
            set_path(task, path, value)
        return task


@dataclass(frozen=True)
class _Top:
    """The study file's scalar fields and sections (``task`` and ``space`` are read apart)."""

    name: str
    trials: int
    objective: _RawObjective = field(default_factory=lambda: _RawObjective("accuracy"))
    parallel: int = 1
    seed: int = 0
    rounds: int | None = None
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    baseline: bool = False


@dataclass(frozen=True)
class _RawObjective:
    metric: str
    direction: Direction | None = None


@dataclass(frozen=True)
class _RawParam:
    type: ParamKind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None


#: A check of one trial task: raises SimulationConfigError naming the task's field.
TaskCheck = Callable[[Mapping[str, Any], str, str], object]

#: Trials and parallel trials a study may ask for (a typo must not start 10^6 processes).
MAX_TRIALS = 10_000
MAX_PARALLEL = 256


def simulation_check(apps: tuple[str, ...] = ()) -> TaskCheck:
    """The default check: the task builds as a simulation (:func:`config_from_dict`) that
    trains in one process (``simulation.engine.processes`` 1)."""

    def check(task: Mapping[str, Any], source: str, base_dir: str) -> SimulationConfig:
        config = config_from_dict(task, source=source, base_dir=base_dir, apps=apps)
        if config.engine.processes > 1:
            raise SimulationConfigError(
                source, "simulation.engine.processes", "must be 1 in a study: each trial "
                "trains in one process; the study's parallel: runs trials side by side")
        return config

    return check


def load_study_file(path: str | Path, *, check: TaskCheck | None = None) -> StudySpec:
    """Reads and checks a study file. ``check`` validates a trial's task (default: as a
    simulation; the coordinator mode passes its own); apps must be loaded before.

    Raises:
        SimulationConfigError: naming the study file (or the base task file, for a fault
            of the task as written) and the field.
    """
    source = str(path)
    text = read_task_file(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SimulationConfigError(source, "", f"not valid YAML{where}") from None
    return study_from_dict(data, source=source, base_dir=str(Path(path).parent),
                           check=check or simulation_check())


def study_from_dict(data: Any, *, source: str = "<study>", base_dir: str = ".",
                    check: TaskCheck | None = None) -> StudySpec:
    """As :func:`load_study_file`, from parsed YAML."""

    def fail(name: str, message: str) -> SimulationConfigError:
        return SimulationConfigError(source, name, message)

    check = check or simulation_check()
    if not isinstance(data, Mapping):
        raise fail("", f"expected a mapping of study fields, got {fields.describe(data)}")
    for key in ("task", "space"):
        if key not in data:
            raise fail(key, "is required")
    rest = {k: v for k, v in data.items() if k not in ("task", "space")}
    try:
        top = fields.build(_Top, rest)
    except fields.FieldError as exc:
        if exc.message.startswith("unknown field"):
            exc = fields.FieldError(exc.path, exc.message.replace(
                "expected one of: ", "expected one of: space, task, "))
        raise fail(exc.path, exc.message) from None
    assert isinstance(top, _Top)
    _check_top(top, fail)
    task, task_source, task_dir = _read_task(data["task"], source, base_dir, fail)
    space = _parse_space(data["space"], fail)
    metric = top.objective.metric
    direction = top.objective.direction or (
        Direction.MINIMIZE if metric == "loss" else Direction.MAXIMIZE)
    spec = StudySpec(
        name=top.name, task=task, task_source=task_source, base_dir=task_dir, space=space,
        objective=Objective(metric, direction), trials=top.trials, parallel=top.parallel,
        seed=top.seed, rounds=top.rounds, sampler=top.sampler, pruner=top.pruner,
        source=source, baseline=_baseline(task, space, fail) if top.baseline else None)
    _check_tasks(spec, check, fail)
    return spec


def _baseline(task: Mapping[str, Any], space: tuple[Param, ...],
              fail: Callable[[str, str], SimulationConfigError]) -> dict[str, Choice]:
    """The base task's value of each searched field, each inside its range."""
    values: dict[str, Choice] = {}
    for param in space:
        where = f"space.{param.path}"
        value = get_path(task, param.path)
        if value is None:
            raise fail(where, "baseline: true needs the task's own value of this field, and "
                              "the task has none; write it in the task")
        if param.kind is ParamKind.CATEGORICAL:
            if value not in param.choices:
                raise fail(f"{where}.choices", f"baseline: true needs the task's value "
                                               f"{value!r} among the choices")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not (
                param.low <= value <= param.high):
            raise fail(where, f"baseline: true needs the task's value {value!r} inside "
                              f"[{param.low:g}, {param.high:g}]")
        values[param.path] = value
    return values


def _check_top(top: _Top, fail: Callable[[str, str], SimulationConfigError]) -> None:
    if not top.name.strip():
        raise fail("name", "must not be empty")
    if not 1 <= top.trials <= MAX_TRIALS:
        raise fail("trials", f"must be between 1 and {MAX_TRIALS}, got {top.trials}")
    if not 1 <= top.parallel <= MAX_PARALLEL:
        raise fail("parallel", f"must be between 1 and {MAX_PARALLEL}, got {top.parallel}")
    if top.seed < 0:
        raise fail("seed", f"must be at least 0, got {top.seed}")
    if top.rounds is not None and top.rounds < 1:
        raise fail("rounds", f"must be at least 1, got {top.rounds}")
    if not top.objective.metric.strip():
        raise fail("objective.metric", "must not be empty")
    if top.sampler.startup_trials < 0:
        raise fail("sampler.startup_trials",
                   f"must be at least 0, got {top.sampler.startup_trials}")
    if top.pruner.startup_trials < 0:
        raise fail("pruner.startup_trials",
                   f"must be at least 0, got {top.pruner.startup_trials}")
    if top.pruner.warmup_rounds < 0:
        raise fail("pruner.warmup_rounds", f"must be at least 0, got {top.pruner.warmup_rounds}")


def _read_task(raw: Any, source: str, base_dir: str,
               fail: Callable[[str, str], SimulationConfigError]
               ) -> tuple[Mapping[str, Any], str, str]:
    """(the task's data, the file it is read from, its directory)."""
    if isinstance(raw, Mapping):
        return raw, source, base_dir
    if not isinstance(raw, str) or not raw.strip():
        raise fail("task", f"expected a task file's path or the task as a mapping, got "
                           f"{fields.describe(raw)}")
    path = Path(base_dir) / raw
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail("task", f"cannot read the task file {path}: {exc.strerror or exc}") from None
    try:
        task = yaml.safe_load(text)
    except yaml.YAMLError:
        raise SimulationConfigError(str(path), "", "not valid YAML") from None
    if not isinstance(task, Mapping):
        raise SimulationConfigError(str(path), "", "expected a mapping of task fields")
    return task, str(path), str(path.parent)


def _parse_space(raw: Any, fail: Callable[[str, str], SimulationConfigError]
                 ) -> tuple[Param, ...]:
    if not isinstance(raw, Mapping) or not raw:
        raise fail("space", f"expected a mapping of task fields to ranges, got "
                            f"{fields.describe(raw)}")
    params = []
    for path, entry in raw.items():
        where = f"space.{path}"
        if not isinstance(path, str) or not all(path.split(".")):
            raise fail("space", f"keys are dotted task-file fields, got {path!r}")
        if isinstance(entry, Mapping) and entry.get("type") == ParamKind.CATEGORICAL.value:
            params.append(_categorical(path, entry, fail))
            continue
        try:
            p = fields.build(_RawParam, entry, where)
        except fields.FieldError as exc:
            raise fail(exc.path, exc.message) from None
        assert isinstance(p, _RawParam)
        if p.type is ParamKind.CATEGORICAL:  # unreachable: handled above; keeps mypy exact
            raise fail(f"{where}.type", "categorical takes choices")
        for end in ("low", "high"):
            if getattr(p, end) is None:
                raise fail(f"{where}.{end}", f"is required for type {p.type.value}")
        low, high = float(p.low or 0.0), float(p.high or 0.0)
        if p.type is ParamKind.INT:
            for end, value in (("low", low), ("high", high)):
                if not value.is_integer():
                    raise fail(f"{where}.{end}", f"must be an integer for type int, got {value}")
            if p.step is not None and not (p.step.is_integer() and p.step >= 1):
                raise fail(f"{where}.step", f"must be a positive integer, got {p.step}")
        if not low <= high:
            raise fail(f"{where}.high", f"must be at least low ({low:g}), got {high:g}")
        if p.log and low <= 0:
            raise fail(f"{where}.low", f"must be positive with log: true, got {low:g}")
        if p.log and p.step is not None:
            raise fail(f"{where}.step", "cannot be combined with log: true")
        if p.step is not None and not p.step > 0:
            raise fail(f"{where}.step", f"must be positive, got {p.step}")
        params.append(Param(path, p.type, low, high, p.log, p.step))
    return tuple(params)


def _categorical(path: str, entry: Mapping[str, Any],
                 fail: Callable[[str, str], SimulationConfigError]) -> Param:
    where = f"space.{path}"
    for key in entry:
        if key not in ("type", "choices"):
            raise fail(f"{where}.{key}", "unknown field (expected one of: choices, type)")
    choices = entry.get("choices")
    if not isinstance(choices, list) or not choices:
        raise fail(f"{where}.choices", f"expected a non-empty list, got "
                                       f"{fields.describe(choices)}")
    for i, c in enumerate(choices):
        if not isinstance(c, bool | int | float | str) or (
                isinstance(c, float) and not math.isfinite(c)):
            raise fail(f"{where}.choices[{i}]", f"expected a number, a string or true/false, "
                                                f"got {fields.describe(c)}")
    if len(set(map(repr, choices))) != len(choices):
        raise fail(f"{where}.choices", "must not repeat a value")
    return Param(path, ParamKind.CATEGORICAL, choices=tuple(choices))


def _check_tasks(spec: StudySpec, check: TaskCheck,
                 fail: Callable[[str, str], SimulationConfigError]) -> None:
    """The base task as the study runs it, then with each parameter at each corner."""
    try:
        check(spec.trial_task({}), spec.task_source, spec.base_dir)
    except SimulationConfigError as exc:
        if spec.rounds is not None and exc.field == "rounds":
            raise fail("rounds", exc.message) from None
        raise
    for param in spec.space:
        for value in param.corners():
            try:
                check(spec.trial_task({param.path: value}), spec.task_source, spec.base_dir)
            except KeyError as exc:
                raise fail(f"space.{param.path}", str(exc.args[0])) from None
            except SimulationConfigError as exc:
                what = "" if exc.field == param.path else f"{exc.field}: "
                raise fail(f"space.{param.path}", f"{value!r} makes the task invalid: "
                                                  f"{what}{exc.message}") from None


def get_path(data: Mapping[str, Any], path: str) -> Any:
    """The value at the dotted ``path`` of ``data``; None where there is none."""
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Writes ``value`` at the dotted ``path`` of ``data``, creating sections on the way.

    Raises:
        KeyError: a section on the path holds a value that is not a mapping.
    """
    keys = path.split(".")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None or child == "off":
            child = {}
        if not isinstance(child, Mapping):
            raise KeyError(f"{'.'.join(keys[:i + 1])} is {fields.describe(child)} in the task, "
                           "not a section")
        node[key] = child = dict(child)
        node = child
    node[keys[-1]] = value
