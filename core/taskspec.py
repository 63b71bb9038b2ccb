"""Task files: YAML -> :class:`~core.types.TaskSpec`, with errors that name file and field.

The parser is driven by the dataclass fields of :mod:`core.types`, so a new field needs no
parser change. Unknown keys are errors (a typo must not silently fall back to a default).

A task file looks like::

    name: digits-mlp
    model:
      architecture: mlp
      arguments: {input_dim: 64, hidden: [64], num_classes: 10}
    rounds: 5
    clients_per_round: 10
    min_reports: 8
    over_selection: 1.3
    round_deadline_s: 60
    local: {epochs: 5, batch_size: 16, optimizer: sgd, learning_rate: 0.1}
    server: {kind: fedavg, learning_rate: 1.0}
    evaluation: {fraction: 0.2, server_data: "digits:split=test"}
    robustness: {weight_cap: 1024, max_update_l2_norm: 1000, max_abs_parameter: 1.0e6}
    eligibility:                  # optional; every field defaults to "any device"
      require_charging: true
      arm: {salt: 3f9c..., weights: [0.5, 0.5], index: 1}   # only experiment arm 1's
          # devices (core.types.ArmFilter); fedctl experiment launch writes it per arm
          # for partition_training: true
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from core import fields
from core.errors import CoreError
from core.experiments.assignment import TrafficSplit
from core.experiments.errors import ExperimentSpecError
from core.experiments.spec import ExperimentSpec, experiment_spec_to_dict, parse_experiment_spec
from core.privacy.errors import PrivacySpecError
from core.privacy.spec import (
    FixedClip,
    PrivacyMode,
    PrivacySpec,
    privacy_from_dict,
    privacy_to_dict,
)
from core.types import (
    Aggregation,
    ArmFilter,
    Evaluation,
    FederatedEvaluation,
    HistogramBins,
    MetricRange,
    TaskKind,
    TaskSpec,
)


class TaskSpecError(CoreError):
    """A task file or task spec is invalid. ``str()`` names the source and the field."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source = source
        self.field = field
        self.message = message
        where = f"field '{field}'" if field else "top level"
        super().__init__(f"{source}: {where}: {message}")


def load_task_file(path: str | Path, *, overrides: Mapping[str, Any] | None = None
                   ) -> TaskSpec:
    """Reads and validates a YAML task file; ``overrides`` (dotted field -> value, e.g.
    ``{"evaluate.source_task": "t-1"}``: a command line's options) replace the file's
    values before it is validated.

    Raises:
        TaskSpecError: the file is missing, is not YAML, or a field is wrong; the message
            names the file and the field.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskSpecError(source, "", f"cannot read the file: {exc.strerror or exc}") from None
    return parse_task_yaml(text, source=source, overrides=overrides)


def parse_task_yaml(text: str, *, source: str = "<task>",
                    overrides: Mapping[str, Any] | None = None) -> TaskSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise TaskSpecError(source, "", f"not valid YAML{where}") from None
    if not isinstance(data, Mapping):
        raise TaskSpecError(source, "", "expected a mapping of task fields")
    for dotted, value in (overrides or {}).items():
        data = _overridden(data, dotted.split("."), value, source, dotted)
    return spec_from_dict(data, source=source)


def _overridden(data: Mapping[str, Any], path: list[str], value: Any, source: str,
                dotted: str) -> dict[str, Any]:
    out = dict(data)
    head, rest = path[0], path[1:]
    if not rest:
        out[head] = value
        return out
    inner = out.get(head) or {}
    if not isinstance(inner, Mapping):
        raise TaskSpecError(source, dotted.rsplit(".", len(rest))[0], "expected a mapping")
    out[head] = _overridden(inner, rest, value, source, dotted)
    return out


def spec_from_dict(data: Mapping[str, Any], *, source: str = "<task>") -> TaskSpec:
    """Builds and validates a TaskSpec from plain data (parsed YAML or stored JSON)."""
    spec = _build(TaskSpec, data, source, "")
    validate_task_spec(spec, source=source)
    assert isinstance(spec, TaskSpec)
    return spec


def spec_to_dict(spec: TaskSpec) -> dict[str, Any]:
    """Plain JSON/YAML-ready data; ``spec_from_dict(spec_to_dict(s)) == s``."""
    return typing.cast(dict[str, Any], _plain(spec))


#: Bounds that keep a task file from asking the coordinator for absurd work or memory.
MAX_ROUNDS = 1_000_000
MAX_CLIENTS_PER_ROUND = 100_000
MAX_FEATURE_DIM = 1 << 20


def validate_task_spec(spec: TaskSpec, *, source: str = "<task>") -> None:
    """Checks ranges and relations between fields. Model arguments are checked by
    :func:`core.models.build_model` (it needs torch)."""

    def fail(field: str, message: str) -> typing.NoReturn:
        raise TaskSpecError(source, field, message)

    if not spec.name.strip():
        fail("name", "must not be empty")
    if not spec.model.architecture:
        fail("model.architecture", "must name a registered architecture")
    if not 1 <= spec.rounds <= MAX_ROUNDS:
        fail("rounds", f"must be between 1 and {MAX_ROUNDS}, got {spec.rounds}")
    if not 1 <= spec.clients_per_round <= MAX_CLIENTS_PER_ROUND:
        fail("clients_per_round", f"must be between 1 and {MAX_CLIENTS_PER_ROUND}, got "
                                  f"{spec.clients_per_round}")
    if not 1 <= spec.min_reports <= spec.clients_per_round:
        fail(
            "min_reports",
            f"must be between 1 and clients_per_round ({spec.clients_per_round}), "
            f"got {spec.min_reports}",
        )
    if not 1.0 <= spec.over_selection <= 10.0:
        fail("over_selection", f"must be between 1.0 and 10.0, got {spec.over_selection}")
    if not 0 < spec.round_deadline_s <= 7 * 24 * 3600:
        fail("round_deadline_s", f"must be in (0, 604800] seconds, got {spec.round_deadline_s}")
    if not 0 <= spec.selection_window_s < spec.round_deadline_s:
        fail(
            "selection_window_s",
            f"must be >= 0 and below round_deadline_s ({spec.round_deadline_s}), "
            f"got {spec.selection_window_s}",
        )
    if spec.local.epochs < 1:
        fail("local.epochs", f"must be at least 1, got {spec.local.epochs}")
    if spec.local.batch_size < 1:
        fail("local.batch_size", f"must be at least 1, got {spec.local.batch_size}")
    if not spec.local.learning_rate > 0:
        fail("local.learning_rate", f"must be positive, got {spec.local.learning_rate}")
    if not 0 <= spec.local.momentum < 1:
        fail("local.momentum", f"must be in [0, 1), got {spec.local.momentum}")
    if not spec.server.learning_rate > 0:
        fail("server.learning_rate", f"must be positive, got {spec.server.learning_rate}")
    for name in ("momentum", "beta1", "beta2"):
        value = getattr(spec.server, name)
        if not 0 <= value < 1:
            fail(f"server.{name}", f"must be in [0, 1), got {value}")
    if not spec.server.epsilon > 0:
        fail("server.epsilon", f"must be positive, got {spec.server.epsilon}")
    if not 0 <= spec.evaluation.fraction <= 1:
        fail("evaluation.fraction", f"must be in [0, 1], got {spec.evaluation.fraction}")
    if spec.max_update_bytes < 0:
        fail("max_update_bytes", f"must be >= 0 (0 = the model's size), got {spec.max_update_bytes}")
    if spec.seed < 0:
        fail("seed", f"must be >= 0, got {spec.seed}")
    if spec.eligibility.arm is not None:
        _validate_arm_filter(spec.eligibility.arm, fail)
    _validate_robustness(spec, fail)
    _validate_aggregation(spec, fail)
    _validate_evaluate(spec, fail)
    if spec.data_schema is not None:
        schema = spec.data_schema
        if not 1 <= len(schema.feature_shape) <= 8 or not all(
                1 <= d <= MAX_FEATURE_DIM for d in schema.feature_shape):
            fail("data_schema.feature_shape", f"must list 1 to 8 dimensions, each between 1 and "
                                              f"{MAX_FEATURE_DIM}, got {list(schema.feature_shape)}")
        if not 1 <= schema.num_classes <= MAX_FEATURE_DIM:
            fail("data_schema.num_classes", f"must be between 1 and {MAX_FEATURE_DIM}, got "
                                            f"{schema.num_classes}")
    if spec.secure_aggregation is not None:
        _validate_secure_aggregation(spec, fail)
    if spec.privacy is not None:
        _validate_privacy(spec, fail)


#: Most arms an ``eligibility.arm`` filter's split may have (the weights travel in every
#: stored spec; an experiment with more arms than this has nothing to compare well).
MAX_FILTER_ARMS = 64


def _validate_arm_filter(arm: ArmFilter, fail: typing.Callable[[str, str], typing.NoReturn]
                         ) -> None:
    """``eligibility.arm``: written by ``fedctl experiment launch`` (``partition_training``)
    on each arm's training task, and accepted by hand too: a spec read back from storage or
    the wire goes through this parser, and engineers who launch an arm's task themselves
    (``--arm-tasks``) writes it. Either way it must name a real arm of a real split."""
    if not arm.salt.strip():
        fail("eligibility.arm.salt", "must be a non-empty string: the experiment's salt")
    if not 2 <= len(arm.weights) <= MAX_FILTER_ARMS:
        fail("eligibility.arm.weights", f"must list 2 to {MAX_FILTER_ARMS} arm weights (the "
                                        f"experiment's traffic split), got {len(arm.weights)}")
    try:
        TrafficSplit(arm.weights)
    except ValueError as exc:
        fail("eligibility.arm.weights", str(exc))
    if not 0 <= arm.index < len(arm.weights):
        fail("eligibility.arm.index", f"must be an arm of the split, 0 to "
                                      f"{len(arm.weights) - 1}, got {arm.index}")
    if arm.weights[arm.index] <= 0:
        fail("eligibility.arm.index", f"arm {arm.index} has weight 0: no device would be "
                                      f"admitted")


#: Bounds on the robustness section: beyond them the section protects nothing (a float32
#: model overflows long before a parameter of 1e30, and a weight above 2^31 is no cap).
MAX_WEIGHT_CAP = 1 << 31
MAX_BOUND = 1e30


def _validate_robustness(spec: TaskSpec, fail: typing.Callable[[str, str], typing.NoReturn]
                         ) -> None:
    r = spec.robustness
    if not 1 <= r.weight_cap <= MAX_WEIGHT_CAP:
        fail("robustness.weight_cap", f"must be between 1 and {MAX_WEIGHT_CAP} examples, got "
                                      f"{r.weight_cap}")
    if not 0 < r.max_update_l2_norm <= MAX_BOUND:
        fail("robustness.max_update_l2_norm", f"must be in (0, {MAX_BOUND:g}], got "
                                              f"{r.max_update_l2_norm}")
    if not 0 < r.max_abs_parameter <= MAX_BOUND:
        fail("robustness.max_abs_parameter", f"must be in (0, {MAX_BOUND:g}], got "
                                             f"{r.max_abs_parameter}")
    clip = spec.privacy.clip if spec.privacy is not None else None
    if spec.secure_aggregation is None and clip is not None:
        norm = (clip.l2_clip_norm if isinstance(clip, FixedClip)
                else clip.initial_l2_clip_norm)
        if norm > r.max_update_l2_norm:
            fail("robustness.max_update_l2_norm",
                 f"{r.max_update_l2_norm:g} is below privacy.clip ({norm:g}): devices clip "
                 f"their updates to privacy.clip, and the coordinator would refuse them")


def _validate_aggregation(spec: TaskSpec, fail: typing.Callable[[str, str], typing.NoReturn]
                          ) -> None:
    a = spec.aggregation
    if not 1 <= a.buffer <= MAX_CLIENTS_PER_ROUND:
        fail("aggregation.buffer", f"must be between 1 and {MAX_CLIENTS_PER_ROUND}, got {a.buffer}")
    if not a.buffer <= a.max_concurrency <= MAX_CLIENTS_PER_ROUND:
        fail("aggregation.max_concurrency", f"must be between aggregation.buffer ({a.buffer}) "
                                            f"and {MAX_CLIENTS_PER_ROUND}, got {a.max_concurrency}")
    if not 0 <= a.staleness.exponent <= 10:
        fail("aggregation.staleness.exponent", f"must be in [0, 10], got {a.staleness.exponent}")
    if not 0 <= a.max_staleness <= MAX_ROUNDS:
        fail("aggregation.max_staleness", f"must be between 0 and {MAX_ROUNDS}, got "
                                          f"{a.max_staleness}")
    r = a.robust
    if not 0 <= r.trim_fraction < 0.5:
        fail("aggregation.robust.trim_fraction", f"must be in [0, 0.5), got {r.trim_fraction}")
    if r.byzantine < 0:
        fail("aggregation.robust.byzantine", f"must be >= 0, got {r.byzantine}")
    if r.multi_krum_m is not None and r.multi_krum_m < 1:
        fail("aggregation.robust.multi_krum_m", f"must be at least 1 or auto, got {r.multi_krum_m}")
    if r.norm_bound is not None and not 0 < r.norm_bound <= MAX_BOUND:
        fail("aggregation.robust.norm_bound", f"must be in (0, {MAX_BOUND:g}] or auto, got "
                                              f"{r.norm_bound}")
    if not 0 < r.norm_multiplier <= 1000:
        fail("aggregation.robust.norm_multiplier", f"must be in (0, 1000], got "
                                                   f"{r.norm_multiplier}")


def _validate_evaluate(spec: TaskSpec, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """A task of kind ``evaluate``: its ``evaluate`` section, and the sections that do not
    apply to it (or that it does not support: see each message)."""
    from core.evaluation.plan import BUILT_IN_METRICS, MAX_BINS, plan_for, plan_problem
    from core.privacy.spec import AdaptiveClip

    section = spec.evaluate
    if spec.kind is not TaskKind.EVALUATE:
        if section != FederatedEvaluation():
            fail("evaluate", "only a task of kind 'evaluate' has this section (add "
                             "'kind: evaluate', or remove it)")
        return
    if spec.evaluation != Evaluation():
        fail("evaluation", "is the side evaluation of a training task; a task of kind "
                           "'evaluate' reports through its 'evaluate' section")
    if spec.aggregation != Aggregation():
        fail("aggregation", "a task of kind 'evaluate' sums its devices' reports in "
                            "synchronous rounds; remove the section")
    if not section.source_task and section.versions not in ((), (0,)):
        fail("evaluate.versions", f"without evaluate.source_task only version 0 (this task's "
                                  f"initial model) exists, got {list(section.versions)}")
    if section.source_task and not 0 < len(section.source_task) <= 128:
        fail("evaluate.source_task", "must be a task id (at most 128 characters)")
    for i, q in enumerate(section.quantiles):
        if not 0 <= q <= 1:
            fail(f"evaluate.quantiles[{i}]", f"must be in [0, 1], got {q}")
    if len(section.quantiles) > 16:
        fail("evaluate.quantiles", f"at most 16, got {len(section.quantiles)}")
    known = {*BUILT_IN_METRICS, *section.metrics}
    for name, bins in section.histograms.items():
        if name not in known:
            fail(f"evaluate.histograms.{name}", f"is not a metric of the task (known: "
                                                f"{', '.join(sorted(known))})")
        if not 1 <= bins.bins <= MAX_BINS:
            fail(f"evaluate.histograms.{name}.bins", f"must be between 1 and {MAX_BINS}, got "
                                                     f"{bins.bins}")
    if section.experiment is not None:
        _validate_experiment(spec, section.experiment, {*BUILT_IN_METRICS, *section.metrics},
                             fail)
    arm_versions = tuple(a.version for a in section.experiment.arms
                         if a.version is not None) if section.experiment else ()
    problem = plan_problem(plan_for(section, section.versions or arm_versions or (0,)))
    if problem is not None:
        fail(*problem)
    if section.sketch and (spec.secure_aggregation is not None or spec.privacy is not None
                           or section.experiment is not None):
        fail("evaluate.sketch", "per-example sketches are sent in the clear, one device at a "
                                "time: a task with secure_aggregation, privacy or an "
                                "experiment cannot ask for them (remove 'sketch: true')")
    privacy = spec.privacy
    if privacy is not None:
        if privacy.mode not in (PrivacyMode.CENTRAL,):
            fail("privacy.mode", f"a task of kind 'evaluate' supports central DP (noise on "
                                 f"the summed reports), not {privacy.mode.value!r}")
        if isinstance(privacy.clip, AdaptiveClip):
            fail("privacy.clip", "a task of kind 'evaluate' needs a fixed clip: its reports "
                                 "are bounded by construction (the clip only scales them)")


def _validate_experiment(spec: TaskSpec, experiment: ExperimentSpec, known: set[str],
                         fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """An experiment between model versions, as the coordinator runs it (the section itself
    was checked by :func:`core.experiments.spec.parse_experiment_spec`). The source task
    may be left for the launch to name (``--source-task``): the coordinator requires it."""
    path = "evaluate.experiment"
    section = spec.evaluate
    for i, arm in enumerate(experiment.arms):
        if arm.version is None:
            fail(f"{path}.arms[{i}].version", "is required: the model version of "
                                              "evaluate.source_task this arm's devices evaluate")
    versions = tuple(a.version for a in experiment.arms if a.version is not None)
    if section.versions and section.versions != versions:
        fail("evaluate.versions", f"an experiment evaluates its arms' versions {list(versions)}"
                                  f"; leave evaluate.versions out (it is {list(section.versions)})")
    if experiment.primary.name not in known:
        fail(f"{path}.primary_metric.name", f"{experiment.primary.name!r} is not a metric of "
                                            f"the task (known: {', '.join(sorted(known))})")
    if experiment.primary.covariate is not None and experiment.primary.covariate_arm is None:
        fail(f"{path}.primary_metric.covariate", "a coordinator experiment's CUPED covariate "
                                                 "is the primary metric under an arm's model, "
                                                 f"'{experiment.primary.name}@ARM' (every "
                                                 "device evaluates that model too); no "
                                                 "pre-period value is collected")
    for i, rail in enumerate(experiment.guardrails):
        if rail.metric not in known:
            fail(f"{path}.guardrails[{i}].metric", f"{rail.metric!r} is not a metric of the "
                                                   f"task (known: {', '.join(sorted(known))})")
    if experiment.strata and spec.secure_aggregation is not None:
        fail(f"{path}.strata", "per-stratum splits need each stratum's devices counted per "
                               "arm (the sample-ratio check), which only clear reports "
                               "give; remove secure_aggregation or the strata")
    if spec.privacy is not None:
        fail("privacy", "an experiment's sample-ratio check and statistics need exact device "
                        "counts per arm; central DP noises them (not supported yet)")
    if spec.rounds < experiment.horizon_rounds:
        fail(f"{path}.horizon_rounds", f"is {experiment.horizon_rounds}, but the task runs "
                                       f"only {spec.rounds} rounds: set rounds >= the horizon")


def _validate_privacy(spec: TaskSpec, fail: typing.Callable[[str, str], typing.NoReturn]) -> None:
    """Relations between the privacy section and the rest (the section itself was checked by
    :func:`core.privacy.spec.privacy_from_dict`)."""
    privacy = spec.privacy
    assert privacy is not None
    if privacy.mode in (PrivacyMode.CENTRAL, PrivacyMode.DISTRIBUTED):
        assert privacy.population is not None
        if privacy.population < spec.selection_target:
            fail("privacy.population", f"{privacy.population} is below the cohort of "
                                       f"{spec.selection_target} (clients_per_round x "
                                       f"over_selection): a sampling rate must be at most 1")
    if privacy.mode is PrivacyMode.DISTRIBUTED and spec.secure_aggregation is None:
        fail("privacy.mode", "'distributed' needs secure_aggregation: the devices' noise "
                             "shares only protect anyone inside a masked sum")


def _validate_secure_aggregation(spec: TaskSpec, fail: typing.Callable[[str, str], typing.NoReturn]
                                 ) -> None:
    from core.secagg.params import SecAggParamError, derive

    sa = spec.secure_aggregation
    assert sa is not None
    if not sa.clip > 0:
        fail("secure_aggregation.clip", f"must be positive, got {sa.clip}")
    if not 0 < sa.phase_timeout_s <= 3600:
        fail("secure_aggregation.phase_timeout_s", f"must be in (0, 3600], got {sa.phase_timeout_s}")
    if sa.threshold is not None and not 0 < sa.threshold <= 1:
        fail("secure_aggregation.threshold", f"must be in (0, 1] or auto, got {sa.threshold}")
    if sa.neighbours is not None and sa.neighbours < 2:
        fail("secure_aggregation.neighbours", f"must be at least 2 or auto, got {sa.neighbours}")
    try:
        params = derive(sa, spec.selection_target)
    except SecAggParamError as exc:
        fail("secure_aggregation", f"with {spec.selection_target} devices per round: {exc}")
    if params.threshold > spec.min_reports and params.threshold > spec.clients_per_round:
        fail("secure_aggregation", f"the threshold {params.threshold} exceeds clients_per_round")


def privacy_field(value: Any, path: str) -> PrivacySpec | None:
    """The privacy section has its own parser (clip is a number *or* a mapping)."""
    if value is False:  # ``privacy: off`` in YAML 1.1
        return None
    try:
        privacy = privacy_from_dict(value, "", path=path)
    except PrivacySpecError as exc:
        raise fields.FieldError(exc.field, exc.message) from None
    return None if privacy.mode is PrivacyMode.OFF else privacy


def experiment_field(value: Any, path: str) -> ExperimentSpec:
    """The ``evaluate.experiment`` section. Without a ``salt`` a fresh one is drawn
    (:func:`core.experiments.new_salt`) when the file is read; the launched task stores it,
    so the assignment stays the same for the task's life, restarts included."""
    from core.experiments.assignment import new_salt

    if isinstance(value, Mapping) and "salt" not in value:
        value = {**value, "salt": new_salt()}
    try:
        return parse_experiment_spec(value)
    except ExperimentSpecError as exc:
        raise fields.FieldError(fields.join(path, exc.field) if exc.field else path,
                                exc.message) from None


def _named(tp: type) -> typing.Callable[[Any, str], dict[str, Any]]:
    """A hook for a ``Mapping[str, tp]`` section: each value built as a ``tp``."""

    def build(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise fields.FieldError(path, f"expected a mapping, got {fields.describe(value)}")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise fields.FieldError(path, f"keys must be strings, got {key!r}")
            out[key] = fields.build(tp, {} if item is None else item, fields.join(path, key))
        return out

    return build


_HOOKS: fields.Hooks = {
    PrivacySpec: privacy_field,
    ExperimentSpec: experiment_field,
    Mapping[str, MetricRange]: _named(MetricRange),
    Mapping[str, HistogramBins]: _named(HistogramBins),
}


def _build(tp: Any, value: Any, source: str, path: str) -> Any:
    """Converts plain data to ``tp``, raising TaskSpecError at the field on a mismatch."""
    try:
        return fields.build(tp, value, path, hooks=_HOOKS)
    except fields.FieldError as exc:
        raise TaskSpecError(source, exc.path, exc.message) from None


def _plain(value: Any) -> Any:
    return fields.plain(value, hooks={PrivacySpec: privacy_to_dict,
                                      ExperimentSpec: experiment_spec_to_dict})
