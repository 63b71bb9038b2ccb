"""What the coordinator checks of a task's model at launch, before anything is written: that
the model builds here, its size, and that it fits the data, both the data the task declares
(``data_schema``) and the data its population reported at check-in
(:mod:`coordinator.rounds.schemas`). A task that cannot fit is refused with a message naming
both sides; what was checked is returned, one line each, for the launch response and log.

The rules:

* the model must build; an architecture this coordinator does not know is refused, saying
  that the coordinator needs the app that defines it (``--app``) or its installed entry
  point;
* with a declared ``data_schema``, one example of it (zeros, ``[1, *feature_shape]``) must
  give ``[1, num_classes]`` outputs (:func:`core.model_fit.fit_problem`); anything the
  model's code raises is the refusal's reason (INVALID_ARGUMENT: the task contradicts itself);
* the population's *prevailing* schema (the one the most devices reported in the window;
  any of them on a tie) must be the declared one, or, without a declaration, the model must
  fit it (FAILED_PRECONDITION: :class:`~coordinator.rounds.errors.DataMismatch`). Schemas
  fewer devices reported are listed, not refused: those devices will decline the task, and a
  few devices (or one malicious one) cannot block a launch;
* when no device of the population has reported yet, the launch proceeds unchecked, and the
  lines say so.

Pace steering and privacy sampling (:func:`check_pace`): with check-in pacing on
(:mod:`coordinator.rounds.pacing`), a device returns about every population / pace seconds
(at most 60 s), so a selection window of ``selection_window_s`` sees about
``pace x selection_window_s`` devices. Selection stays what the accountant assumes either
way (the draw records the devices seen, :class:`core.sampling.CohortDraw`), but a DP task
whose window sees a fraction of its population is worse off: fixed-size sampling's q =
cohort / min(population, seen) rises (its budget is spent faster), and Poisson's cohorts are
p x seen, a fraction of the target (its rounds miss their goal). So a task with privacy
sampling whose window is shorter than min(population / pace, 60 s) is refused at launch,
naming the window that works and the pace that would. (The alternative, not pacing its
devices away from its windows, would herd the whole population into each window: the load
pacing exists to avoid, and the next window's opening is not known while a round trains.)

torch is imported here only when a check runs (the model is built by the caller's
:func:`core.models.initial_state` path and again here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.rounds.errors import DataMismatch, InvalidRequest, shown
from coordinator.rounds.pacing import PACE_MAX_S
from coordinator.rounds.schemas import SchemaCount, describe_schema
from core.errors import CoreError
from core.types import DataSchema, TaskSpec

#: Tensors a launch line lists by name and shape before it says "N more".
_TENSORS_SHOWN = 6


def initial_params(spec: TaskSpec) -> dict[str, np.ndarray]:
    """The task's model version 0 (:func:`core.models.initial_state`).

    Raises:
        InvalidRequest: the model cannot be built; for an architecture this coordinator does
            not know, the message says how to give it the app.
    """
    from core.models import initial_state, model_names

    try:
        return initial_state(spec.model, seed=spec.seed)
    except CoreError as exc:
        name = spec.model.architecture
        if name not in model_names():
            raise InvalidRequest(
                f"spec.model.architecture: this coordinator does not know the architecture "
                f"{shown(name)}; start it with the app that defines it (`fedctl coordinator "
                f"serve --app module:attribute`) or install the package whose "
                f"'fedcoord.models' entry point provides it (known here: "
                f"{', '.join(model_names())})") from None
        raise InvalidRequest(f"spec.model: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code: any error refuses the launch
        raise InvalidRequest(f"spec.model: building {shown(spec.model.architecture)} raised "
                             f"{type(exc).__name__}: {exc}") from None


def check_launch(spec: TaskSpec, params: Mapping[str, np.ndarray],
                 reported: Sequence[SchemaCount], *, window_s: float) -> list[str]:
    """Checks ``spec``'s model against its declared data and the schemas its population
    reported in the last ``window_s`` seconds (``reported``: most devices first); returns
    what was checked, one line each.

    Raises:
        InvalidRequest: the model does not fit its declared ``data_schema``, or cannot be
            built.
        DataMismatch: the declared schema, or the model, does not fit the population's
            prevailing schema; the message names both sides.
    """
    from core.model_fit import fit_problem
    from core.models import build_model

    lines = [describe_params(spec.model.architecture, params)]
    try:
        model = build_model(spec.model)
    except Exception as exc:  # noqa: BLE001 - it built once already; user code may vary
        raise InvalidRequest(f"spec.model: {exc}") from None
    declared = spec.data_schema
    if declared is not None:
        problem = fit_problem(model, declared)
        if problem is not None:
            raise InvalidRequest(
                f"spec.data_schema: task {shown(spec.name)}: the model does not fit the data "
                f"the task declares, {describe_schema(declared)}: {problem}")
        lines.append(f"declared data {describe_schema(declared)}: the model fits it")
    population = spec.population
    if not reported:
        lines.append(f"population {shown(population)}: no device reported its data in the "
                     f"last {window_s:.0f} s; the model was not checked against it")
        return lines
    top = [c for c in reported if c.devices == reported[0].devices]

    def fits(schema: DataSchema) -> str | None:
        if declared is not None:
            return None if schema == declared else "differs from the declared data"
        return fit_problem(model, schema)

    problems = {c.schema: fits(c.schema) for c in top}
    if all(p is not None for p in problems.values()):
        first = top[0]
        if declared is not None:
            raise DataMismatch(
                f"task {shown(spec.name)} declares data {describe_schema(declared)}, but "
                f"population {shown(population)} reported {first.describe()}")
        raise DataMismatch(
            f"task {shown(spec.name)}: the model does not fit the data population "
            f"{shown(population)} reported, {first.describe()}: {problems[first.schema]}")
    for count in reported:
        problem = problems[count.schema] if count.schema in problems else fits(count.schema)
        verdict = "the model fits it" if problem is None else \
            f"those devices will decline the task ({problem})"
        lines.append(f"population {shown(population)} reported {count.describe()}: {verdict}")
    return lines


def check_pace(spec: TaskSpec, *, pace_per_s: float) -> str | None:
    """Checks that ``spec``'s selection window sees its DP population at the coordinator's
    check-in pace (``pace_per_s``; 0: pacing off): a task with privacy sampling (central or
    distributed DP: ``privacy.population``) needs ``selection_window_s`` of at least
    min(population / pace, 60 s), the time in which every paced device checks in once.
    Returns the launch line saying so; None for a task without privacy sampling or with
    pacing off.

    Raises:
        InvalidRequest: the window is shorter; the message names the window and the pace
            that would do.
    """
    privacy = spec.privacy
    if pace_per_s <= 0 or privacy is None or privacy.population is None:
        return None
    population = privacy.population
    needed_s = min(population / pace_per_s, PACE_MAX_S)
    window_s = spec.selection_window_s
    if window_s < needed_s:
        raise InvalidRequest(
            f"spec.selection_window_s: task {shown(spec.name)} samples its cohorts from a "
            f"population of {population:,} devices ({privacy.sampling.value} sampling), but "
            f"at this coordinator's check-in pace of {pace_per_s:g}/s a {window_s:g} s "
            f"selection window sees only about {pace_per_s * window_s:,.0f} of them (fixed "
            f"size: q rises and the privacy budget is spent faster; Poisson: cohorts fall "
            f"short of the target); set selection_window_s to at least {needed_s:.3g} s, or "
            f"start the coordinator with --checkin-pace of at least "
            f"{population / window_s:.3g}")
    return (f"privacy sampling: a {window_s:g} s selection window sees the population of "
            f"{population:,} at the check-in pace of {pace_per_s:g}/s (it needs "
            f"{needed_s:.3g} s)")


def describe_params(architecture: str, params: Mapping[str, np.ndarray]) -> str:
    """``model 'mlp': 4,810 parameters in 4 tensors: 0.weight [32, 64], ...``."""
    total = sum(int(np.size(v)) for v in params.values())
    tensors = [f"{name} {list(np.shape(v))}" for name, v in
               list(params.items())[:_TENSORS_SHOWN]]
    if len(params) > _TENSORS_SHOWN:
        tensors.append(f"{len(params) - _TENSORS_SHOWN} more")
    return (f"model {shown(architecture)}: {total:,} parameters in {len(params)} tensors: "
            f"{', '.join(tensors)}")
