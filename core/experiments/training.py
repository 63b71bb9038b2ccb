"""Experiments whose arms differ by training configuration (or by training rounds): the
``simulation.experiment`` section of a *training* task file, read the same way by
``fedctl simulate`` (:mod:`simulations.experiment`) and by ``fedctl experiment launch`` on a
coordinator (:mod:`fedctl.experiment`)::

    simulation:
      experiment:                     # core.experiments.spec's fields, and per arm:
        arms:
          - {name: control, weight: 0.5}                     # the task as written
          - name: fast
            weight: 0.5
            training: {local.learning_rate: 0.1, local.epochs: 2}   # dotted task fields
            trained_rounds: 20        # optional where an arm has training: (default: the
                                      # task's rounds); required otherwise
        devices_per_round: 10         # optional: devices per comparison round
        partition_training: true      # optional (default false): each arm's model is
                                      # trained by its own arm's devices only
        device_strata: {low_end: 0.3} # optional, with strata: the share of the simulated
                                      # devices declaring each stratum (simulation only: a
                                      # coordinator's devices declare their own)

**What an arm is.** Arm ``i`` is the model the file's task produces after
``trained_rounds[i]`` rounds when trained under the task's configuration with
``training[i]`` applied (:data:`TRAINING_FIELDS` lists what an arm may change). Arms with
the same ``training`` share one training run (:func:`training_groups`): the arms of
``simulations/examples/ab_test.yaml`` (5 and 30 rounds of the same task) are two versions
of one run, arms with different configurations are separate runs with the same seed (the
same initial model, the same cohorts where the configuration leaves them alone).

**How arms are compared.** After training, each device is assigned an arm by
:func:`core.experiments.assignment.assign_arm` (HMAC of its id under the experiment's salt:
sticky, nothing to store but the salt) and evaluates *only its arm's model* on its held-out
data; the always-valid comparisons and :func:`core.experiments.decision.decide` run after
each round. On a coordinator the training runs are training tasks (one per group) and the
comparison is an evaluation task whose arms name their training task and version
(:func:`comparison_experiment`), so a restart changes nothing.

**What the comparison is about** (say it when reporting): one trained model per arm, so the
test is of *these* models on the population's devices, conditional on the training runs; it
does not average over training randomness (seeds), as one run per arm cannot.

**Who trains an arm's model.** By default (``partition_training: false``) each arm's model
is trained by the task's whole population, as the task alone would be: the comparison is
sound without a partition (the arms are evaluated on disjoint, randomly assigned devices'
held-out data, and every arm's model saw the same kind of training data).

With ``partition_training: true`` each arm's model is trained by *its arm's devices only*
and evaluated by them: the arm's training run gets :func:`arm_filter` (the experiment's
salt, its weights in arm order, the arm's index: :class:`core.types.ArmFilter`), the very
assignment the comparison evaluates by, so a device trains and evaluates the same arm. Every
arm then has a run of its own (:func:`training_groups`; arms with the same ``training`` no
longer share one, since they train on different devices). The same filter decides in both
places:

- on a coordinator, ``fedctl experiment launch`` writes it as ``eligibility.arm`` of each
  arm's training task (:func:`group_task`); the check-in
  (:func:`coordinator.rounds.selection.is_eligible`) does not offer the task to a device of
  another arm: with the task named it is told there is no task for it (``NO_TASK``), without
  it is offered another running task it is eligible for, its own arm's;
- in ``fedctl simulate`` (:mod:`simulations.experiment`) the arm's run sees only its arm's
  devices online (:func:`arm_members`, the vectorized :meth:`~core.types.ArmFilter.admits`).

What it means: each arm is a federation of its own over a random ``weight`` share of the
population, and the comparison asks which configuration does better *when it trains and
serves its own devices* (the deployment an A/B rollout of a training configuration would
be). Two consequences to report: an arm's model trains on ``weight`` of the devices (rounds
fill more slowly and may fail where few devices are online; a DP task's fixed-size ``q`` is
computed from the eligible devices seen, so the arm's; a Poisson task's ``p`` stays
``target / privacy.population``, so write the arm's expected size there if cohorts must
stay full), and the devices that evaluate an arm's model are those it was trained on
(their training split; they evaluate on the held-out split), the same for every arm, so
the comparison stays fair. Selection within an arm stays unbiased: the filter is a keyed
hash of the device id alone, a fixed sub-population chosen independently of rounds and
data, and sampling within it is what the accountant analyses.

Pure functions over plain data; errors are :class:`ExperimentSpecError` naming the field
below ``simulation.experiment`` (``arms[1].training.local.epochs``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from core.experiments.assignment import TrafficSplit, assign_arms, stratum_problem
from core.experiments.errors import ExperimentSpecError
from core.experiments.spec import ExperimentSpec, experiment_spec_to_dict, parse_experiment_spec
from core.types import ArmFilter

#: What an arm's ``training`` may change, dotted as in task files, with a check of the value
#: (the task's own validation runs on each arm's task afterwards).
TRAINING_FIELDS: Mapping[str, str] = {
    "local.learning_rate": "number > 0",
    "local.epochs": "integer >= 1",
    "local.batch_size": "integer >= 1",
    "local.optimizer": "optimizer name",
    "local.momentum": "number >= 0",
    "server.kind": "server optimizer name",
    "server.learning_rate": "number > 0",
    "server.momentum": "number >= 0",
    "simulation.algorithm.kind": "fedavg | fedprox | scaffold (simulation only)",
    "simulation.algorithm.mu": "number >= 0 (FedProx's mu; simulation only)",
}
#: Fields only ``fedctl simulate`` runs: a coordinator's devices train plain local SGD/Adam,
#: so an arm that changes these cannot run there (refused rather than silently ignored).
SIMULATION_ONLY_PREFIX = "simulation."
#: Keys of the section that :func:`parse_experiment_spec` does not know.
ARM_KEYS = ("training", "trained_rounds")
TOP_KEYS = ("devices_per_round", "partition_training", "device_strata")

Overrides = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class TrainingArms:
    """The section, read: the spec (arms without their training keys) and per arm (in
    ``spec.arms`` order) its overrides (sorted by field) and its training rounds.
    ``partition_training``: each arm's model is trained by its arm's devices only."""

    spec: ExperimentSpec
    training: tuple[Overrides, ...]
    trained_rounds: tuple[int, ...]
    devices_per_round: int
    partition_training: bool = False
    #: ``device_strata``: (stratum, share of the simulated devices), in file order.
    device_strata: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TrainingGroup:
    """One training run: the overrides it applies and the rounds it runs (the most any of
    its arms needs); ``arms``: indices of the arms whose models it produces;
    ``arm_filter``: under ``partition_training``, the devices it trains on (its one arm's)."""

    training: Overrides
    rounds: int
    arms: tuple[int, ...]
    arm_filter: ArmFilter | None = None


def parse_training_arms(raw: Any, *, task_rounds: int, default_devices_per_round: int,
                        max_devices: int | None = None) -> TrainingArms:
    """Validates the ``simulation.experiment`` section of a training task whose ``rounds``
    is ``task_rounds``. Each arm needs ``trained_rounds`` (0 to ``task_rounds``) unless some
    arm has ``training`` (then it defaults to ``task_rounds``: an arm without ``training``
    is the task as written). ``devices_per_round`` defaults
    to ``default_devices_per_round`` and is between 2 and ``max_devices`` when given.
    ``partition_training`` (default false) is a boolean; with it every arm has a weight
    above 0 (an arm without devices could not be trained).

    Raises:
        ExperimentSpecError: naming the field below the section.
    """
    if not isinstance(raw, Mapping):
        raise ExperimentSpecError("", f"must be a mapping, got {type(raw).__name__}")
    core_raw = {k: v for k, v in raw.items() if k not in TOP_KEYS}
    arms = raw.get("arms")
    training: list[Overrides] = []
    rounds: list[int] = []
    if isinstance(arms, list):
        configured = any(isinstance(a, Mapping) and "training" in a for a in arms)
        stripped: list[Any] = []
        for i, arm in enumerate(arms):
            if isinstance(arm, Mapping):
                overrides = (_overrides(arm["training"], f"arms[{i}].training")
                             if "training" in arm else ())
                training.append(overrides)
                rounds.append(_trained_rounds(arm, i, task_rounds, configured))
                arm = {k: v for k, v in arm.items() if k not in ARM_KEYS}
            stripped.append(arm)
        core_raw["arms"] = stripped
    spec = parse_experiment_spec(core_raw)
    per_round = raw.get("devices_per_round", default_devices_per_round)
    high = max_devices if max_devices is not None else math.inf
    if isinstance(per_round, bool) or not isinstance(per_round, int) or not (
            2 <= per_round <= high):
        bound = "" if max_devices is None else f" and simulation.population.devices " \
                                               f"({max_devices})"
        raise ExperimentSpecError("devices_per_round", f"must be an integer between 2{bound}"
                                                       f", got {per_round!r}")
    partition = raw.get("partition_training", False)
    if not isinstance(partition, bool):
        raise ExperimentSpecError("partition_training", f"must be true or false, got "
                                                        f"{partition!r}")
    if partition and spec.strata:
        raise ExperimentSpecError("strata", "is not supported with partition_training: an "
                                            "arm's training task admits devices by the "
                                            "default split alone (eligibility.arm); remove "
                                            "one of them")
    if partition:
        for i, arm in enumerate(spec.arms):
            if arm.weight <= 0:
                raise ExperimentSpecError(f"arms[{i}].weight", "is 0: with partition_training "
                                                               "the arm's model is trained by "
                                                               "its own devices, and it has none")
    device_strata = _device_strata(raw.get("device_strata"))
    if device_strata and not spec.strata:
        raise ExperimentSpecError("device_strata", "needs strata: the per-stratum splits the "
                                                   "devices' strata choose")
    return TrainingArms(spec, tuple(training), tuple(rounds), per_round, partition,
                        device_strata)


def _device_strata(value: Any) -> tuple[tuple[str, float], ...]:
    """``device_strata``: stratum names, each a share in (0, 1], summing to at most 1."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not value:
        raise ExperimentSpecError("device_strata", "must map stratum names to the share of "
                                                   "the devices in each, got "
                                                   f"{type(value).__name__}")
    out: list[tuple[str, float]] = []
    for name, share in value.items():
        problem = stratum_problem(name) if isinstance(name, str) else "must be a string"
        if problem is not None:
            raise ExperimentSpecError("device_strata", f"stratum name {str(name)[:40]!r}: "
                                                       f"{problem}")
        if isinstance(share, bool) or not isinstance(share, int | float) \
                or not 0.0 < float(share) <= 1.0:
            raise ExperimentSpecError(f"device_strata.{name}", f"must be a share in (0, 1], "
                                                               f"got {share!r}")
        out.append((name, float(share)))
    total = math.fsum(share for _, share in out)
    if total > 1.0 + 1e-9:
        raise ExperimentSpecError("device_strata", f"the shares sum to {total:g}, more than 1")
    return tuple(out)


def _trained_rounds(arm: Mapping[str, Any], i: int, task_rounds: int, configured: bool
                    ) -> int:
    path = f"arms[{i}].trained_rounds"
    if "trained_rounds" not in arm:
        if configured:
            return task_rounds
        raise ExperimentSpecError(path, "is required: the training rounds of the model this "
                                        "arm evaluates (0: the initial model), unless arms "
                                        "name training configurations (training:), where it "
                                        "defaults to the task's rounds")
    n = arm["trained_rounds"]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= task_rounds:
        raise ExperimentSpecError(path, f"must be an integer between 0 and the task's rounds "
                                        f"({task_rounds}), got {n!r}")
    return n


def _overrides(value: Any, path: str) -> Overrides:
    if not isinstance(value, Mapping) or not value:
        raise ExperimentSpecError(path, "must be a non-empty mapping of task fields to values "
                                        f"(e.g. {{local.learning_rate: 0.1}}), got {value!r}")
    flat: dict[str, Any] = {}
    _flatten(value, "", flat, path)
    for key, v in flat.items():
        if key not in TRAINING_FIELDS:
            raise ExperimentSpecError(f"{path}.{key}", f"an arm may change only "
                                                       f"{', '.join(TRAINING_FIELDS)}")
        if not _valid_value(key, v):
            raise ExperimentSpecError(f"{path}.{key}", f"must be a {TRAINING_FIELDS[key]}, "
                                                       f"got {v!r}")
    return tuple(sorted(flat.items()))


def _flatten(value: Mapping[Any, Any], prefix: str, out: dict[str, Any], path: str) -> None:
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ExperimentSpecError(path, f"keys must be task fields, got {key!r}")
        dotted = f"{prefix}{key}"
        if isinstance(v, Mapping):
            _flatten(v, dotted + ".", out, path)
        elif dotted in out:
            raise ExperimentSpecError(f"{path}.{dotted}", "is set twice")
        else:
            out[dotted] = v


def _valid_value(key: str, value: Any) -> bool:
    """Whether ``value`` is of ``key``'s kind (names are checked by the task's own
    validation, on each arm's task)."""
    kind = TRAINING_FIELDS[key]
    if kind.startswith("integer"):
        return not isinstance(value, bool) and isinstance(value, int) and value >= 1
    if kind.startswith("number"):
        return (not isinstance(value, bool) and isinstance(value, int | float)
                and math.isfinite(value) and (value > 0 if "> 0" in kind else value >= 0))
    return isinstance(value, str) and bool(value)


def training_groups(arms: TrainingArms) -> tuple[TrainingGroup, ...]:
    """The training runs the arms need: one per distinct ``training`` (in the order of
    each's first arm), running as many rounds as its arms' largest ``trained_rounds``.
    Under ``partition_training`` one per arm, in arm order, each with its arm's filter
    (arms with the same ``training`` train on different devices, so share no run)."""
    if arms.partition_training:
        return tuple(TrainingGroup(o, arms.trained_rounds[i], (i,), arm_filter(arms, i))
                     for i, o in enumerate(arms.training))
    order: list[Overrides] = []
    members: dict[Overrides, list[int]] = {}
    for i, overrides in enumerate(arms.training):
        if overrides not in members:
            order.append(overrides)
            members[overrides] = []
        members[overrides].append(i)
    return tuple(TrainingGroup(o, max(arms.trained_rounds[i] for i in members[o]),
                               tuple(members[o])) for o in order)


def apply_training(task: Mapping[str, Any], overrides: Overrides) -> dict[str, Any]:
    """A deep copy of the task data with ``overrides`` written at their dotted fields.

    Raises:
        ExperimentSpecError: a section on a field's path is not a mapping in the task.
    """
    out: dict[str, Any] = copy.deepcopy(dict(task))
    for dotted, value in overrides:
        keys = dotted.split(".")
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            if not isinstance(child, Mapping):
                raise ExperimentSpecError(dotted, f"{'.'.join(keys[:i + 1])} is not a section "
                                                  f"in the task")
            node[key] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return out


def simulation_only(arms: TrainingArms) -> tuple[int, str] | None:
    """(arm index, field) of the first override only a simulation runs; None if none."""
    for i, overrides in enumerate(arms.training):
        for key, _ in overrides:
            if key.startswith(SIMULATION_ONLY_PREFIX):
                return i, key
    return None


def group_task(task: Mapping[str, Any], group: TrainingGroup, *, name: str) -> dict[str, Any]:
    """The coordinator training task of ``group``: the file's task without its
    ``simulation`` section, the group's overrides applied, ``rounds`` the group's, named
    ``name``, and (under ``partition_training``) ``eligibility.arm`` the group's filter."""
    data = apply_training({k: v for k, v in task.items() if k != "simulation"},
                          group.training)
    data["name"] = name
    data["rounds"] = group.rounds
    if group.arm_filter is not None:
        eligibility = data.get("eligibility")
        data["eligibility"] = {**(eligibility if isinstance(eligibility, Mapping) else {}),
                               "arm": arm_filter_to_dict(group.arm_filter)}
    return data


def group_name(task_name: str, arms: TrainingArms, group: TrainingGroup) -> str:
    """``<task>-<first arm>`` (``<task>-<arm>+<arm>`` when the run serves several arms)."""
    names = "+".join(arms.spec.arms[i].name for i in group.arms)
    return f"{task_name}-{names}"[:120]


def comparison_experiment(arms: TrainingArms, arm_tasks: Sequence[str]) -> dict[str, Any]:
    """The ``evaluate.experiment`` section of the comparison task: the spec's fields, each
    arm naming its training task (``arm_tasks[i]``) and that task's version (its
    ``trained_rounds``). Raises ``ValueError`` for a task list of the wrong length."""
    if len(arm_tasks) != len(arms.spec.arms):
        raise ValueError(f"{len(arms.spec.arms)} arms need as many task ids, got "
                         f"{len(arm_tasks)}")
    out = experiment_spec_to_dict(arms.spec)
    out["arms"] = [{"name": a.name, "weight": a.weight, "task": arm_tasks[i],
                    "task_version": arms.trained_rounds[i]}
                   for i, a in enumerate(arms.spec.arms)]
    return out


def comparison_task(task: Mapping[str, Any], arms: TrainingArms, arm_tasks: Sequence[str],
                    *, max_examples: int = 1024) -> dict[str, Any]:
    """The evaluation task that compares the arms' models on the devices (each evaluates its
    arm's model only, on its held-out split): the file's model, seed, population,
    eligibility and deadlines, ``horizon_rounds`` rounds of ``devices_per_round`` devices.
    Central DP and secure aggregation of the training task are not carried over (an
    experiment needs exact device counts per arm)."""
    data: dict[str, Any] = {
        "name": f"{task.get('name', 'experiment')}-comparison"[:120],
        "kind": "evaluate",
        "model": copy.deepcopy(task.get("model")),
        "rounds": arms.spec.horizon_rounds,
        "clients_per_round": arms.devices_per_round,
        "min_reports": min(2, arms.devices_per_round),
        "over_selection": 1.0,
        "evaluate": {"split": "test", "max_examples": max_examples,
                     "experiment": comparison_experiment(arms, arm_tasks)},
    }
    for key in ("seed", "population", "eligibility", "round_deadline_s",
                "selection_window_s"):
        if key in task:
            data[key] = copy.deepcopy(task[key])
    return data


def training_mismatch(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """Where the task data ``actual`` trains otherwise than ``expected`` (both as
    :func:`core.taskspec.spec_to_dict` writes them), over the fields an arm may change that a
    coordinator runs: ``"local.learning_rate is 0.05, the arm needs 0.2"`` each."""
    out = []
    for key in TRAINING_FIELDS:
        if key.startswith(SIMULATION_ONLY_PREFIX):
            continue
        want, got = _get(expected, key), _get(actual, key)
        if want != got:
            out.append(f"{key} is {got!r}, the arm needs {want!r}")
    want, got = _get(expected, "eligibility.arm"), _get(actual, "eligibility.arm")
    if want != got:  # described without the salt, which need not reach a terminal
        out.append(f"eligibility.arm {_describe_filter(got)}, the arm needs it to "
                   f"{_describe_filter(want)}")
    return out


def _describe_filter(data: Any) -> str:
    if not isinstance(data, Mapping):
        return "admit every arm's devices"
    return (f"admit arm {data.get('index')}'s devices of the split {data.get('weights')} "
            f"under the experiment's salt")


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def arm_filter(arms: TrainingArms, arm: int) -> ArmFilter:
    """The filter that admits arm ``arm``'s devices: the experiment's salt and traffic split
    (weights in ``spec.arms`` order), the very assignment the comparison evaluates by
    (:func:`comparison_experiment` keeps the salt, the arm order and the weights), so a
    device trains and evaluates the same arm."""
    return ArmFilter(arms.spec.salt, tuple(a.weight for a in arms.spec.arms), arm)


def arm_filter_to_dict(arm_filter: ArmFilter) -> dict[str, Any]:
    """``eligibility.arm`` as a task file writes it."""
    return {"salt": arm_filter.salt, "weights": list(arm_filter.weights),
            "index": arm_filter.index}


def arm_admits(device_id: str, *, salt: str, weights: Sequence[float], arm: int) -> bool:
    """Whether ``device_id`` belongs to arm ``arm`` (the assignment the comparison uses):
    :meth:`core.types.ArmFilter.admits`, the check a coordinator's check-in makes for a
    task with ``eligibility.arm``. Raises ``ValueError`` for an empty device id or bad
    weights."""
    return ArmFilter(salt, tuple(float(w) for w in weights), arm).admits(device_id)


def arm_members(arm_filter: ArmFilter, device_ids: Sequence[str]) -> npt.NDArray[np.bool_]:
    """:meth:`core.types.ArmFilter.admits` of each id, vectorized (a simulation's devices):
    a boolean array in the ids' order."""
    arms = assign_arms(device_ids, salt=arm_filter.salt,
                       split=TrafficSplit(arm_filter.weights))
    return np.asarray(arms == arm_filter.index, dtype=np.bool_)
