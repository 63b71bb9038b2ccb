"""The public surface of core.experiments is what __init__ re-exports; pinned here so a
rename is a decision, not an accident."""

from __future__ import annotations

import core.experiments as experiments

PUBLIC = {
    "DEFAULT_SRM_THRESHOLD", "Action", "AlwaysValidResult", "Arm", "ArmStats", "CupedArms",
    "Decision", "Difference", "Direction", "ExperimentError", "ExperimentSpec",
    "ExperimentSpecError", "FixedHorizonResult", "Guardrail", "PrimaryMetric", "SrmResult",
    "StratifiedSplit", "TrafficSplit", "always_valid_look", "assign_arm", "assign_arms",
    "assignment_unit", "assignment_units", "confidence_sequence_radius", "cuped_adjust",
    "cuped_arms", "cuped_theta", "decide", "difference_in_means", "msprt_log_likelihood_ratio",
    "msprt_p_values", "new_salt", "parse_experiment_spec", "srm_check", "stratified_srm_check",
    "stratum_problem", "welch_p_values", "welch_test",
}  # fmt: skip


def test_the_public_names_are_exactly_the_pinned_ones_and_all_resolve() -> None:
    assert set(experiments.__all__) == PUBLIC
    assert len(experiments.__all__) == len(PUBLIC)  # no name listed twice
    for name in PUBLIC:
        assert getattr(experiments, name) is not None
