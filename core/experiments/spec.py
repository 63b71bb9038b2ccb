"""An experiment spec (the ``experiment`` YAML, already loaded as a dict) -> :class:`ExperimentSpec`.

::

    arms:                        # two or more; the first is the control unless `control` says
      - {name: control, weight: 0.5}
      - {name: new_model, weight: 0.5}   # version: N (optional): the model version this
                                         # arm evaluates, in a coordinator experiment
    # or, arms whose models come from different training tasks (training-configuration
    # experiments, core.experiments.training): every arm names its task and that task's
    # version; `version` is then the arm's slot in the evaluation (default: its index)
    #   - {name: fast, weight: 0.5, task: TASK_ID, task_version: 20}
    control: control             # optional
    primary_metric:
      name: accuracy
      direction: increase        # increase | decrease: which way is better
      covariate: accuracy_pre    # optional: a pre-period metric for CUPED, or, in a
                                 # coordinator experiment, accuracy@control: the primary
                                 # metric under arm control's model, evaluated by every
                                 # device in the same report (see covariate_arm)
    guardrails:                  # optional
      - {metric: loss, max_increase: 0.02}      # harm: loss rises by more than 0.02
      - {metric: latency_ms, max_increase: 5}
      - {metric: retention, max_decrease: 0.0}  # harm: any proven drop
    mde: 0.01                    # minimum detectable effect, in the primary metric's units
    alpha: 0.05
    horizon_rounds: 20
    salt: 3f9c...                # the assignment key; new_salt() makes one
    tau: 0.01                    # optional: the mSPRT mixing scale (default: mde)
    srm_threshold: 0.001         # optional
    strata:                      # optional: per-stratum traffic splits (see assignment.py);
      low_end: {control: 0.9, new_model: 0.1}   # a name: up to 32 letters, digits, _ or -;
                                                # arms left out get weight 0

Unknown keys are errors. Every error is an :class:`ExperimentSpecError` (a ``ValueError``)
naming the field by its path (``arms[1].weight``); the caller that read the file adds the
file name with :meth:`ExperimentSpecError.with_source`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.experiments.assignment import StratifiedSplit, TrafficSplit, stratum_problem
from core.experiments.errors import ExperimentSpecError

#: The sample-ratio check's default threshold (:mod:`core.experiments.srm`); defined here so
#: that reading a spec does not import scipy.
DEFAULT_SRM_THRESHOLD = 0.001

_TOP_KEYS = (
    "arms", "control", "primary_metric", "guardrails", "mde", "alpha", "horizon_rounds",
    "salt", "tau", "srm_threshold", "strata",
)  # fmt: skip
_WEIGHT_SUM_TOLERANCE = 1e-9


class Direction(enum.Enum):
    """Which way a metric moving is good (primary) or is checked for harm (guardrail)."""

    INCREASE = "increase"
    DECREASE = "decrease"


@dataclass(frozen=True)
class Arm:
    """``version``: the model version the arm's devices evaluate (an experiment that runs
    as a coordinator evaluation task); None where arms differ otherwise (simulations).
    ``task``: the training task the arm's model comes from, when arms come from different
    tasks (then ``task_version`` is that task's version, None until the launch resolves the
    latest, and ``version`` only labels the arm's model in the evaluation)."""

    name: str
    weight: float
    version: int | None = None
    task: str | None = None
    task_version: int | None = None


@dataclass(frozen=True)
class PrimaryMetric:
    """``covariate``: CUPED's covariate: a pre-period metric's name, or ``<name>@<arm>``
    (:attr:`covariate_arm`)."""

    name: str
    direction: Direction
    covariate: str | None = None

    @property
    def covariate_arm(self) -> str | None:
        """The arm named by a ``<name>@<arm>`` covariate: every device also evaluates that
        arm's model, and its value of the primary metric there is its covariate. Sound for
        CUPED because it is a function of the device's data alone (every device computes it
        whatever its arm), so it is independent of the assignment. None otherwise."""
        if self.covariate is None or "@" not in self.covariate:
            return None
        return self.covariate.split("@", 1)[1]


@dataclass(frozen=True)
class Guardrail:
    """Harm is proven when the treatment - control difference of ``metric`` is beyond
    ``limit`` in the ``harmful`` direction with the whole confidence sequence: for
    ``INCREASE`` its lower end is above ``+limit``, for ``DECREASE`` its upper end below
    ``-limit``. ``limit >= 0`` is in the metric's units."""

    metric: str
    harmful: Direction
    limit: float


@dataclass(frozen=True)
class ExperimentSpec:
    arms: tuple[Arm, ...]
    control: str
    primary: PrimaryMetric
    guardrails: tuple[Guardrail, ...]
    mde: float
    alpha: float
    horizon_rounds: int
    salt: str
    tau: float
    srm_threshold: float
    strata: Mapping[str, tuple[float, ...]]

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arms)

    @property
    def treatments(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arms if a.name != self.control)

    @property
    def comparison_alpha(self) -> float:
        """alpha per treatment-vs-control comparison: Bonferroni over the treatment arms, so
        the chance of any false success stays at most ``alpha``."""
        return self.alpha / len(self.treatments)

    def split(self) -> TrafficSplit | StratifiedSplit:
        """The traffic split for :func:`core.experiments.assignment.assign_arm`."""
        default = TrafficSplit([a.weight for a in self.arms])
        if not self.strata:
            return default
        return StratifiedSplit(default, {k: TrafficSplit(w) for k, w in self.strata.items()})


def parse_experiment_spec(raw: Any) -> ExperimentSpec:
    """Validate ``raw`` (a mapping loaded from YAML). Raises :class:`ExperimentSpecError`."""
    if not isinstance(raw, Mapping):
        raise ExperimentSpecError("", f"an experiment must be a mapping, got {_describe(raw)}")
    _no_unknown_keys(raw, _TOP_KEYS, "")
    arms = _arms(_required(raw, "arms", ""))
    names = tuple(a.name for a in arms)
    control = raw.get("control", names[0])
    if control not in names:
        raise ExperimentSpecError("control", f"{control!r} is not an arm (arms: {list(names)})")
    primary = _primary(_required(raw, "primary_metric", ""))
    if primary.covariate_arm is not None and primary.covariate_arm not in names:
        raise ExperimentSpecError("primary_metric.covariate", f"{primary.covariate_arm!r} is "
                                                              f"not an arm (arms: "
                                                              f"{list(names)})")
    guardrails = _guardrails(raw.get("guardrails", []))
    mde = _positive(_required(raw, "mde", ""), "mde")
    alpha = _number(_required(raw, "alpha", ""), "alpha")
    if not 0.0 < alpha < 0.5:
        raise ExperimentSpecError("alpha", f"must be in (0, 0.5), got {alpha!r}")
    horizon = _required(raw, "horizon_rounds", "")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ExperimentSpecError(
            "horizon_rounds", f"must be an integer >= 1, got {_describe(horizon)}"
        )
    salt = _required(raw, "salt", "")
    if not isinstance(salt, str) or not salt.strip():
        raise ExperimentSpecError("salt", f"must be a non-empty string, got {_describe(salt)}")
    tau = _positive(raw["tau"], "tau") if "tau" in raw else mde
    srm_threshold = _number(raw.get("srm_threshold", DEFAULT_SRM_THRESHOLD), "srm_threshold")
    if not 0.0 < srm_threshold < 1.0:
        raise ExperimentSpecError("srm_threshold", f"must be in (0, 1), got {srm_threshold!r}")
    strata = _strata(raw.get("strata", {}), names)
    return ExperimentSpec(
        arms=arms,
        control=str(control),
        primary=primary,
        guardrails=guardrails,
        mde=mde,
        alpha=alpha,
        horizon_rounds=horizon,
        salt=salt,
        tau=tau,
        srm_threshold=srm_threshold,
        strata=strata,
    )


def experiment_spec_to_dict(spec: ExperimentSpec) -> dict[str, Any]:
    """Plain data that :func:`parse_experiment_spec` reads back to ``spec``."""
    arms: list[dict[str, Any]] = []
    for a in spec.arms:
        arm: dict[str, Any] = {"name": a.name, "weight": a.weight}
        if a.version is not None:
            arm["version"] = a.version
        if a.task is not None:
            arm["task"] = a.task
        if a.task_version is not None:
            arm["task_version"] = a.task_version
        arms.append(arm)
    primary: dict[str, Any] = {"name": spec.primary.name,
                               "direction": spec.primary.direction.value}
    if spec.primary.covariate is not None:
        primary["covariate"] = spec.primary.covariate
    out: dict[str, Any] = {
        "arms": arms, "control": spec.control, "primary_metric": primary,
        "guardrails": [{"metric": g.metric, ("max_increase" if g.harmful is Direction.INCREASE
                                              else "max_decrease"): g.limit}
                       for g in spec.guardrails],
        "mde": spec.mde, "alpha": spec.alpha, "horizon_rounds": spec.horizon_rounds,
        "salt": spec.salt, "tau": spec.tau, "srm_threshold": spec.srm_threshold,
    }
    if spec.strata:
        out["strata"] = {k: dict(zip(spec.arm_names, w, strict=True))
                         for k, w in spec.strata.items()}
    return out


def _arms(value: Any) -> tuple[Arm, ...]:
    if not isinstance(value, list) or len(value) < 2:
        raise ExperimentSpecError(
            "arms", f"must be a list of at least two arms, got {_describe(value)}"
        )
    arms: list[Arm] = []
    for i, item in enumerate(value):
        path = f"arms[{i}]"
        if not isinstance(item, Mapping):
            raise ExperimentSpecError(
                path, f"must be a mapping with name and weight, got {_describe(item)}"
            )
        _no_unknown_keys(item, ("name", "weight", "version", "task", "task_version"), path)
        name = _required(item, "name", path)
        if not isinstance(name, str) or not name.strip():
            raise ExperimentSpecError(
                f"{path}.name", f"must be a non-empty string, got {_describe(name)}"
            )
        if any(a.name == name for a in arms):
            raise ExperimentSpecError(f"{path}.name", f"arm {name!r} is named twice")
        weight = _number(_required(item, "weight", path), f"{path}.weight")
        if not weight > 0.0:
            raise ExperimentSpecError(f"{path}.weight", f"must be > 0, got {weight!r}")
        task, task_version = _arm_task(item, path, value)
        version = item.get("version", i if task is not None else None)
        _check_version(version, f"{path}.version")
        if version is not None and any(a.version == version for a in arms):
            raise ExperimentSpecError(f"{path}.version", f"version {version} is another arm's")
        arms.append(Arm(name, weight, version, task, task_version))
    total = math.fsum(a.weight for a in arms)
    if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
        raise ExperimentSpecError("arms", f"weights must sum to 1, they sum to {total!r}")
    return tuple(arms)


def _arm_task(item: Mapping[Any, Any], path: str, arms: list[Any]
              ) -> tuple[str | None, int | None]:
    """The arm's ``task`` and ``task_version``; every arm names a task or none does."""
    task = item.get("task")
    first_names = isinstance(arms[0], Mapping) and "task" in arms[0]
    if (task is not None) != first_names:
        raise ExperimentSpecError(f"{path}.task", "every arm names its training task, or none "
                                                  "does (then arms name versions of "
                                                  "evaluate.source_task)")
    if task is None:
        if "task_version" in item:
            raise ExperimentSpecError(f"{path}.task_version", "needs task: (the training task "
                                                              "whose version it is)")
        return None, None
    if not isinstance(task, str) or not 0 < len(task) <= 128:
        raise ExperimentSpecError(f"{path}.task", f"must be a task id (1 to 128 characters), "
                                                  f"got {_describe(task)}")
    task_version = item.get("task_version")
    _check_version(task_version, f"{path}.task_version")
    return task, task_version


def _check_version(version: Any, path: str) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version < 0):
        raise ExperimentSpecError(path, f"must be a model version (an integer >= 0), got "
                                        f"{_describe(version)}")


def _primary(value: Any) -> PrimaryMetric:
    path = "primary_metric"
    if not isinstance(value, Mapping):
        raise ExperimentSpecError(
            path, f"must be a mapping with name and direction, got {_describe(value)}"
        )
    _no_unknown_keys(value, ("name", "direction", "covariate"), path)
    name = _metric_name(_required(value, "name", path), f"{path}.name")
    direction = _direction(_required(value, "direction", path), f"{path}.direction")
    covariate = value.get("covariate")
    if covariate is not None:
        covariate = _metric_name(covariate, f"{path}.covariate")
        if "@" in covariate and covariate.split("@", 1)[0] != name:
            raise ExperimentSpecError(f"{path}.covariate", f"a covariate under an arm's "
                                                           f"model is the primary metric "
                                                           f"there: {name}@ARM, got "
                                                           f"{covariate!r}")
    return PrimaryMetric(name, direction, covariate)


def _guardrails(value: Any) -> tuple[Guardrail, ...]:
    if not isinstance(value, list):
        raise ExperimentSpecError("guardrails", f"must be a list, got {_describe(value)}")
    out: list[Guardrail] = []
    for i, item in enumerate(value):
        path = f"guardrails[{i}]"
        if not isinstance(item, Mapping):
            raise ExperimentSpecError(path, f"must be a mapping, got {_describe(item)}")
        _no_unknown_keys(item, ("metric", "max_increase", "max_decrease"), path)
        metric = _metric_name(_required(item, "metric", path), f"{path}.metric")
        limits = [k for k in ("max_increase", "max_decrease") if k in item]
        if len(limits) != 1:
            raise ExperimentSpecError(path, "needs exactly one of max_increase, max_decrease")
        key = limits[0]
        limit = _number(item[key], f"{path}.{key}")
        if limit < 0.0:
            raise ExperimentSpecError(f"{path}.{key}", f"must be >= 0, got {limit!r}")
        harmful = Direction.INCREASE if key == "max_increase" else Direction.DECREASE
        if any(g.metric == metric for g in out):
            raise ExperimentSpecError(f"{path}.metric", f"metric {metric!r} is guarded twice")
        out.append(Guardrail(metric, harmful, limit))
    return tuple(out)


def _strata(value: Any, names: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    if not isinstance(value, Mapping):
        raise ExperimentSpecError(
            "strata", f"must be a mapping of stratum to split, got {_describe(value)}"
        )
    out: dict[str, tuple[float, ...]] = {}
    for stratum, split in value.items():
        path = f"strata.{stratum}"
        if not isinstance(stratum, str) or stratum_problem(stratum) is not None:
            problem = (stratum_problem(stratum) if isinstance(stratum, str)
                       else "must be a string")
            raise ExperimentSpecError(
                "strata", f"stratum name {str(stratum)[:40]!r} {problem} (what a device "
                          f"declares with fedctl agent run --stratum)"
            )
        if not isinstance(split, Mapping):
            raise ExperimentSpecError(
                path, f"must map arm names to weights, got {_describe(split)}"
            )
        _no_unknown_keys(split, names, path)
        weights = tuple(_number(split.get(n, 0.0), f"{path}.{n}") for n in names)
        for n, w in zip(names, weights, strict=True):
            if w < 0.0:
                raise ExperimentSpecError(f"{path}.{n}", f"must be >= 0, got {w!r}")
        total = math.fsum(weights)
        if abs(total - 1.0) > _WEIGHT_SUM_TOLERANCE:
            raise ExperimentSpecError(path, f"weights must sum to 1, they sum to {total!r}")
        out[stratum] = weights
    return out


def _required(raw: Mapping[Any, Any], key: str, parent: str) -> Any:
    if key not in raw:
        raise ExperimentSpecError(_join(parent, key), "is required")
    return raw[key]


def _metric_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ExperimentSpecError(path, f"must be a metric name, got {_describe(value)}")
    return value


def _direction(value: Any, path: str) -> Direction:
    try:
        return Direction(value)
    except ValueError:
        allowed = ", ".join(d.value for d in Direction)
        raise ExperimentSpecError(
            path, f"must be one of {allowed}, got {_describe(value)}"
        ) from None


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ExperimentSpecError(path, f"must be a finite number, got {_describe(value)}")
    return float(value)


def _positive(value: Any, path: str) -> float:
    number = _number(value, path)
    if not number > 0.0:
        raise ExperimentSpecError(path, f"must be > 0, got {number!r}")
    return number


def _no_unknown_keys(raw: Mapping[Any, Any], known: tuple[str, ...], parent: str) -> None:
    for key in raw:
        if key not in known:
            raise ExperimentSpecError(
                _join(parent, str(key)), f"unknown key (expected one of: {', '.join(known)})"
            )


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key
