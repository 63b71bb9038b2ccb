"""Tasks of kind ``evaluate`` (:mod:`core.evaluation`): what their launch resolves (the model
versions under evaluation, packed with the plan into the evaluation bundle, the task's model
file) and what their rounds need at run time (the report layout devices upload).

An evaluation round flows through the training rounds' machinery: selection, the upload
stream or the SecAgg+ stages, central DP and its accountant. Only three things differ: the
"update" is the report vector of the layout (one float32 tensor, :data:`~core.evaluation.
layout.TENSOR_NAME`), the aggregator sums reports instead of averaging updates
(:mod:`coordinator.rounds.evaluation_aggregators`), and the commit trains nothing: it records
the round's results as its metrics and the same bundle as the next version
(:func:`coordinator.rounds.commits.run_evaluation_commit`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from coordinator.rounds.errors import CoordinatorError, InvalidRequest, shown
from coordinator.rounds.launch import initial_params
from coordinator.rounds.models import ModelRepository
from coordinator.storage import Store
from coordinator.storage import errors as storage_errors
from core.errors import CoreError
from core.evaluation import (
    TENSOR_NAME,
    EvaluationLayout,
    EvaluationPlan,
    bundle_metadata,
    bundle_tensors,
    plan_for,
    split_bundle,
)
from core.experiments.decision import Decision
from core.experiments.spec import Arm, ExperimentSpec
from core.experiments.versions import (
    DEFAULT_STRATUM,
    analyze,
    state_metrics,
    strata_key,
    stratum_label,
)
from core.taskspec import spec_from_dict
from core.tensors import TensorInfo
from core.types import FederatedEvaluation, TaskKind, TaskSpec


class StrataTally:
    """An experiment with per-stratum splits: per round, the reporting devices per stratum
    label and evaluated version, for the stratified sample-ratio check
    (:func:`core.experiments.versions.strata_key`). Only counts leave it, never which
    device declared what.

    The round's evaluation aggregator takes a fresh count when it is made
    (:meth:`begin_round`, one per round attempt) and releases it; participation adds each
    accepted report to the open round's (:meth:`count`). Thread-safety: :meth:`count` and
    :meth:`begin_round` run on the event loop; the released count is read on the commit
    thread once the round takes no more reports."""

    def __init__(self, experiment: ExperimentSpec) -> None:
        self.experiment = experiment
        self._current: dict[tuple[str, int], int] = {}

    def begin_round(self) -> dict[tuple[str, int], int]:
        self._current = {}
        return self._current

    def count(self, stratum: str | None, version: int) -> None:
        """One accepted report of a device that declared ``stratum`` and evaluated
        ``version``."""
        key = (stratum_label(self.experiment, stratum), version)
        self._current[key] = self._current.get(key, 0) + 1

    def metrics(self, counts: Mapping[tuple[str, int], int]) -> dict[str, float]:
        """``counts`` as round metrics: every label and arm version, zeros included."""
        labels = (DEFAULT_STRATUM, *sorted(self.experiment.strata))
        return {strata_key(label, arm.version): float(counts.get((label, arm.version), 0))
                for label in labels for arm in self.experiment.arms
                if arm.version is not None}


@dataclass(frozen=True)
class EvaluationSetup:
    """A running evaluation task's report layout and the quantiles it releases;
    ``strata``: an experiment with per-stratum splits counts its devices per stratum."""

    layout: EvaluationLayout
    quantiles: tuple[float, ...]
    strata: StrataTally | None = field(default=None, compare=False)

    @property
    def tensors(self) -> list[TensorInfo]:
        """What a device uploads: the report, one float32 vector."""
        return [TensorInfo(TENSOR_NAME, "float32", (self.layout.length,))]

    @property
    def nbytes(self) -> int:
        return self.layout.length * 4


def evaluation_setup(spec: TaskSpec, *, bundle_plan: EvaluationPlan | None = None
                     ) -> EvaluationSetup | None:
    """The setup of a launched evaluation task (its versions resolved at launch); None for a
    training task. ``bundle_plan``: the plan in the task's stored bundle
    (:func:`core.evaluation.read_plan`), which devices read: when given, it is the layout,
    so a task launched by an older coordinator (a plan without sketches, say) keeps the
    reports its devices were told to send. Without it the plan is derived from ``spec``
    as the launch derived it.

    Raises:
        ValueError: ``bundle_plan`` evaluates other versions than ``spec`` (not this
            task's bundle).
    """
    if spec.kind is not TaskKind.EVALUATE:
        return None
    plan = plan_for(spec.evaluate, evaluated_versions(spec.evaluate),
                    sketches=sketches_examples(spec))
    if bundle_plan is not None:
        if bundle_plan.versions != plan.versions:
            raise ValueError(f"the stored bundle evaluates versions "
                             f"{list(bundle_plan.versions)}, the task {list(plan.versions)}")
        plan = bundle_plan
    experiment = spec.evaluate.experiment
    strata = StrataTally(experiment) if experiment is not None and experiment.strata else None
    return EvaluationSetup(EvaluationLayout(plan), spec.evaluate.quantiles, strata)


def sketches_examples(spec: TaskSpec) -> bool:
    """Whether the task's reports carry KLL sketches of per-example values
    (:class:`core.evaluation.plan.SketchPlan`): only where the task asks for them
    (``evaluate.sketch``: a sketch releases many of a device's per-example values), and only
    when reports reach the coordinator in the clear, one by one (neither secure aggregation
    nor DP: a sketch's merge is not a sum, so it can be neither masked nor noised; those
    tasks keep the histograms' summed quantiles), and not in an experiment, whose statistics
    take one value per device and metric (:mod:`core.experiments.versions`). The task file's
    check refuses ``sketch`` with those; a stored spec is checked again here."""
    return (spec.evaluate.sketch and spec.secure_aggregation is None and spec.privacy is None
            and spec.evaluate.experiment is None)


def evaluated_versions(section: FederatedEvaluation) -> tuple[int, ...]:
    """The version labels a launched evaluation task's reports are laid out by: its
    resolved versions; in an experiment whose arms name their own training tasks, the arms'
    labels (the stored spec leaves ``versions`` empty there: task files name versions of
    ``evaluate.source_task`` in it, and these are no task's versions)."""
    if section.versions:
        return section.versions
    if section.experiment is not None and section.experiment.arms[0].task is not None:
        return tuple(a.version for a in section.experiment.arms if a.version is not None)
    return (0,)


@dataclass(frozen=True)
class EvaluationBundle:
    """What the launch of an evaluation task writes as its model version 0."""

    spec: TaskSpec  # with evaluate.versions resolved
    plan: EvaluationPlan
    params: dict[str, np.ndarray]
    metadata: dict[str, str]
    #: One line for the launch checks.
    line: str


def resolve_bundle(spec: TaskSpec, store: Store, models: ModelRepository) -> EvaluationBundle:
    """Resolves an evaluation task's versions (the source task's latest when none are named)
    and packs them into the bundle. An experiment whose arms name their own training tasks
    (:mod:`core.experiments.training`) takes each arm's model from its task (that task's
    latest version when the arm names none, written into the resolved spec).

    Raises:
        InvalidRequest: naming ``spec.evaluate.source_task``, ``spec.evaluate.versions``,
            ``spec.evaluate.experiment.arms[i].task`` / ``.task_version`` or ``spec.model``
            when a task does not exist, is not a training task, has another model, or lacks
            a version.
    """
    section = spec.evaluate
    experiment = section.experiment
    if experiment is not None and not section.versions:
        arm_versions = tuple(a.version for a in experiment.arms if a.version is not None)
        section = replace(section, versions=arm_versions)
        spec = replace(spec, evaluate=section)
    versions: dict[int, Mapping[str, np.ndarray]]
    if experiment is not None and experiment.arms[0].task is not None:
        versions, experiment = _arm_task_versions(spec, experiment, store, models)
        section = replace(section, experiment=experiment, versions=())
        resolved = replace(spec, evaluate=section)
        source = "the arms' training tasks (" + ", ".join(
            f"{a.name}: task {a.task} v{a.task_version}" for a in experiment.arms) + ")"
    elif experiment is not None and not section.source_task:
        raise InvalidRequest("spec.evaluate.source_task: an experiment compares model versions "
                             "of a training task; name that task (fedctl experiment launch "
                             "FILE --source-task ID)")
    elif not section.source_task:
        versions = {0: initial_params(spec)}
        source = f"its own initial model (seed {spec.seed})"
    else:
        versions = _source_versions(spec, store, models)
        source = f"task {section.source_task}"
    if experiment is None or experiment.arms[0].task is None:
        resolved = replace(spec, evaluate=replace(section, versions=tuple(versions)))
    plan = plan_for(resolved.evaluate, evaluated_versions(resolved.evaluate),
                    sketches=sketches_examples(resolved))
    if plan.declared:
        from core.models import model_hooks  # torch: the launch builds the model anyway

        if model_hooks(spec.model.architecture).metrics is None:
            raise InvalidRequest(
                f"spec.evaluate.metrics: declares {', '.join(plan.declared)}, but model "
                f"{shown(spec.model.architecture)} has no metrics hook to compute them "
                f"(core.models.register_model(..., metrics=...))")
    layout = EvaluationLayout(plan)
    line = (f"evaluates model version(s) {', '.join(map(str, versions))} of {source}: "
            f"metrics {', '.join(m.name for m in plan.metrics)}; reports of "
            f"{layout.length} values")
    if plan.sketch is not None:
        line += (f"; per-example quantiles of {', '.join(plan.sketch.metrics)} from KLL "
                 f"sketches (k = {plan.sketch.k})")
    if experiment is not None:
        arms = ", ".join(f"{a.name} = v{a.version} ({a.weight:.0%})" for a in experiment.arms)
        line += (f"; experiment: arms {arms}, each device evaluates its arm's version only, "
                 f"primary metric {experiment.primary.name}")
    return EvaluationBundle(resolved, plan, bundle_tensors(versions), bundle_metadata(plan),
                            line)


@dataclass(frozen=True)
class ExperimentLook:
    """An experiment after a committed round: its round metrics (``experiment.*``) and the
    decision (:mod:`core.experiments.versions`)."""

    metrics: dict[str, float]
    decision: Decision


def experiment_look(spec: TaskSpec, committed: Sequence[Mapping[str, float]],
                    this_round: Mapping[str, float]) -> ExperimentLook | None:
    """The look after a round whose metrics are ``this_round``, the task's earlier committed
    rounds' being ``committed`` (in order); None for a task that is not an experiment. Pure:
    recomputed from the stored rounds each time, so a restart changes nothing."""
    experiment = spec.evaluate.experiment
    if spec.kind is not TaskKind.EVALUATE or experiment is None:
        return None
    state = analyze(experiment, [*committed, this_round])
    return ExperimentLook(state_metrics(state), state.decision)


def bundle_versions(bundle: EvaluationBundle) -> dict[str, np.ndarray]:
    """The first version's own tensors (unprefixed), for the launch's model checks."""
    first = split_bundle(bundle.params, bundle.plan)[bundle.plan.versions[0]]
    return first


def _source_versions(spec: TaskSpec, store: Store, models: ModelRepository
                     ) -> dict[int, Mapping[str, np.ndarray]]:
    source_id = spec.evaluate.source_task
    _check_training_task(spec, source_id, "spec.evaluate.source_task", store)
    wanted = spec.evaluate.versions
    if not wanted:
        latest = store.latest_model_version(source_id).version
        wanted = (latest,)
    return {version: _load_version(source_id, version, "spec.evaluate.versions", store, models)
            for version in wanted}


def _arm_task_versions(spec: TaskSpec, experiment: ExperimentSpec, store: Store,
                       models: ModelRepository
                       ) -> tuple[dict[int, Mapping[str, np.ndarray]], ExperimentSpec]:
    """Each arm's model from its own training task (the version it names, or that task's
    latest, which the returned spec then names, so the stored task says what was compared),
    keyed by the arm's ``version`` (its label in the bundle)."""
    out: dict[int, Mapping[str, np.ndarray]] = {}
    arms: list[Arm] = []
    for i, arm in enumerate(experiment.arms):
        assert arm.task is not None and arm.version is not None  # parse_experiment_spec
        path = f"spec.evaluate.experiment.arms[{i}]"
        _check_training_task(spec, arm.task, f"{path}.task", store)
        version = arm.task_version
        if version is None:
            version = store.latest_model_version(arm.task).version
        out[arm.version] = _load_version(arm.task, version, f"{path}.task_version", store,
                                         models)
        arms.append(replace(arm, task_version=version))
    return out, replace(experiment, arms=tuple(arms))


def _check_training_task(spec: TaskSpec, task_id: str, field: str, store: Store) -> None:
    """Raises InvalidRequest naming ``field`` unless ``task_id`` is a training task of
    ``spec``'s model."""
    try:
        record = store.get_task(task_id)
    except storage_errors.NotFound:
        raise InvalidRequest(f"{field}: no task with id {shown(task_id)}") from None
    try:
        source = spec_from_dict(json.loads(record.spec_json), source=f"task {task_id}")
    except CoreError as exc:
        raise InvalidRequest(f"{field}: the spec of task {task_id} does not validate: "
                             f"{exc}") from None
    if source.kind is not TaskKind.TRAIN:
        raise InvalidRequest(f"{field}: task {task_id} is an evaluation task; name the "
                             f"training task whose versions it evaluated")
    if source.model != spec.model:
        raise InvalidRequest(
            f"spec.model: task {task_id} trains {source.model.architecture} with arguments "
            f"{dict(source.model.arguments)}, this task names {spec.model.architecture} with "
            f"{dict(spec.model.arguments)}; they must be the same")


def _load_version(task_id: str, version: int, field: str, store: Store,
                  models: ModelRepository) -> Mapping[str, np.ndarray]:
    try:
        return models.load(models.version(task_id, version)).params
    except CoordinatorError as exc:  # NotFound, or Unavailable (a corrupted file)
        latest = store.latest_model_version(task_id).version
        raise InvalidRequest(f"{field}: task {task_id} has no usable model version {version} "
                             f"(its versions are 0 to {latest}): {exc}") from None
