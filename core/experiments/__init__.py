"""A/B experiments: the pure statistics. No network, no storage; the coordinator and the
simulations feed these functions per-device metrics and act on the decision.

- :mod:`.assignment`  sticky, unbiased arm assignment by HMAC-SHA256(salt, device id)
- :mod:`.srm`         sample-ratio-mismatch check (chi-square)
- :mod:`.sequential`  per-arm summaries, mSPRT p-values and confidence sequences (always
                      valid), the fixed-horizon Welch test, CUPED
- :mod:`.spec`        the experiment spec -> :class:`ExperimentSpec` (errors name the field)
- :mod:`.decision`    stop rules: invalid, harm, success, horizon; with the reason
- :mod:`.errors`      the error tree
"""

from core.experiments.assignment import (
    StratifiedSplit,
    TrafficSplit,
    assign_arm,
    assign_arms,
    assignment_unit,
    assignment_units,
    new_salt,
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
from core.experiments.srm import DEFAULT_SRM_THRESHOLD, SrmResult, srm_check

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
    "welch_p_values",
    "welch_test",
]
