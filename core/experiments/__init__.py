"""A/B experiments: the pure statistics. No network, no storage; the coordinator and the
simulations feed these functions per-device metrics and act on the decision.

- :mod:`.assignment`  sticky, unbiased arm assignment by HMAC-SHA256(salt, device id)
- :mod:`.srm`         sample-ratio-mismatch check (chi-square)
- :mod:`.sequential`  per-arm summaries, mSPRT p-values and confidence sequences (always
                      valid), the fixed-horizon Welch test, CUPED
- :mod:`.spec`        the experiment spec -> :class:`ExperimentSpec` (errors name the field)
- :mod:`.decision`    stop rules: invalid, harm, success, horizon; with the reason
- :mod:`.errors`      the error tree
- :mod:`.versions`    an experiment between model versions run as an evaluation task: the
                      arms' statistics and the decision from released round metrics
                      (imported from there; not re-exported here)

Importing the package is cheap (numpy only): the names are loaded on first use, so that
``core.types`` can name :class:`ExperimentSpec` without importing scipy (``fedctl --help``
and every process start would pay for it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.experiments.assignment import (
        StratifiedSplit,
        TrafficSplit,
        assign_arm,
        assign_arms,
        assignment_unit,
        assignment_units,
        new_salt,
        stratum_problem,
    )
    from core.experiments.decision import Action, Decision, decide
    from core.experiments.errors import ExperimentError, ExperimentSpecError
    from core.experiments.sequential import (
        AlwaysValidResult,
        ArmStats,
        CupedArms,
        Difference,
        FixedHorizonResult,
        always_valid_look,
        confidence_sequence_radius,
        cuped_adjust,
        cuped_arms,
        cuped_theta,
        difference_in_means,
        msprt_log_likelihood_ratio,
        msprt_p_values,
        welch_p_values,
        welch_test,
    )
    from core.experiments.spec import (
        Arm,
        Direction,
        ExperimentSpec,
        Guardrail,
        PrimaryMetric,
        parse_experiment_spec,
    )
    from core.experiments.srm import (
        DEFAULT_SRM_THRESHOLD,
        SrmResult,
        srm_check,
        stratified_srm_check,
    )

_HOME = {
    "Action": "core.experiments.decision",
    "AlwaysValidResult": "core.experiments.sequential",
    "Arm": "core.experiments.spec",
    "ArmStats": "core.experiments.sequential",
    "CupedArms": "core.experiments.sequential",
    "DEFAULT_SRM_THRESHOLD": "core.experiments.srm",
    "Decision": "core.experiments.decision",
    "Difference": "core.experiments.sequential",
    "Direction": "core.experiments.spec",
    "ExperimentError": "core.experiments.errors",
    "ExperimentSpec": "core.experiments.spec",
    "ExperimentSpecError": "core.experiments.errors",
    "FixedHorizonResult": "core.experiments.sequential",
    "Guardrail": "core.experiments.spec",
    "PrimaryMetric": "core.experiments.spec",
    "SrmResult": "core.experiments.srm",
    "StratifiedSplit": "core.experiments.assignment",
    "TrafficSplit": "core.experiments.assignment",
    "always_valid_look": "core.experiments.sequential",
    "assign_arm": "core.experiments.assignment",
    "assign_arms": "core.experiments.assignment",
    "assignment_unit": "core.experiments.assignment",
    "assignment_units": "core.experiments.assignment",
    "confidence_sequence_radius": "core.experiments.sequential",
    "cuped_adjust": "core.experiments.sequential",
    "cuped_arms": "core.experiments.sequential",
    "cuped_theta": "core.experiments.sequential",
    "decide": "core.experiments.decision",
    "difference_in_means": "core.experiments.sequential",
    "msprt_log_likelihood_ratio": "core.experiments.sequential",
    "msprt_p_values": "core.experiments.sequential",
    "new_salt": "core.experiments.assignment",
    "parse_experiment_spec": "core.experiments.spec",
    "srm_check": "core.experiments.srm",
    "stratified_srm_check": "core.experiments.srm",
    "stratum_problem": "core.experiments.assignment",
    "welch_p_values": "core.experiments.sequential",
    "welch_test": "core.experiments.sequential",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_SRM_THRESHOLD",
    "Action",
    "AlwaysValidResult",
    "Arm",
    "ArmStats",
    "CupedArms",
    "Decision",
    "Difference",
    "Direction",
    "ExperimentError",
    "ExperimentSpec",
    "ExperimentSpecError",
    "FixedHorizonResult",
    "Guardrail",
    "PrimaryMetric",
    "SrmResult",
    "StratifiedSplit",
    "TrafficSplit",
    "always_valid_look",
    "assign_arm",
    "assign_arms",
    "assignment_unit",
    "assignment_units",
    "confidence_sequence_radius",
    "cuped_adjust",
    "cuped_arms",
    "cuped_theta",
    "decide",
    "difference_in_means",
    "msprt_log_likelihood_ratio",
    "msprt_p_values",
    "new_salt",
    "parse_experiment_spec",
    "srm_check",
    "stratified_srm_check",
    "stratum_problem",
    "welch_p_values",
    "welch_test",
]
