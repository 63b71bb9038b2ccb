"""Stop rules: invalid before harm before success before horizon; each says why."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.experiments.decision import Action, decide
from core.experiments.sequential import (
    AlwaysValidResult,
    ArmStats,
    always_valid_look,
    difference_in_means,
)
from core.experiments.spec import ExperimentSpec, parse_experiment_spec
from core.experiments.srm import srm_check

RAW: dict[str, Any] = {
    "arms": [{"name": "control", "weight": 0.5}, {"name": "new_model", "weight": 0.5}],
    "primary_metric": {"name": "accuracy", "direction": "increase"},
    "guardrails": [
        {"metric": "latency_ms", "max_increase": 5.0},
        {"metric": "retention", "max_decrease": 0.01},
    ],
    "mde": 0.01,
    "alpha": 0.05,
    "horizon_rounds": 10,
    "salt": "s",
}
SPEC = parse_experiment_spec(RAW)


def look(lower: float, upper: float, p: float = 0.5, *, alpha: float = 0.05) -> AlwaysValidResult:
    return AlwaysValidResult(
        looks=3,
        estimate=(lower + upper) / 2,
        variance=1e-4,
        p_value=p,
        lower=lower,
        upper=upper,
        tau=0.01,
        alpha=alpha,
    )


NEUTRAL = look(-0.01, 0.01)


def test_no_rule_met_continues() -> None:
    decision = decide(SPEC, round_number=3, primary={"new_model": NEUTRAL})
    assert decision.action is Action.CONTINUE and not decision.stops
    assert decision.reason == "round 3 of 10: no stop rule met"


def test_success_needs_a_small_p_value_and_the_effect_on_the_wanted_side() -> None:
    decision = decide(SPEC, round_number=4, primary={"new_model": look(0.004, 0.03, p=0.01)})
    assert decision.action is Action.STOP_SUCCESS
    assert (decision.arm, decision.metric) == ("new_model", "accuracy")
    assert decision.reason.startswith("new_model beats control on accuracy: +0.017")
    assert "always-valid p=0.01 < 0.05" in decision.reason


def test_a_proven_move_the_wrong_way_on_the_primary_metric_is_harm() -> None:
    decision = decide(SPEC, round_number=4, primary={"new_model": look(-0.03, -0.004, p=0.01)})
    assert decision.action is Action.STOP_HARM
    assert "primary metric accuracy is worse for new_model than control" in decision.reason


def test_for_a_metric_that_should_decrease_lower_is_success() -> None:
    spec = parse_experiment_spec(
        {**RAW, "primary_metric": {"name": "loss", "direction": "decrease"}}
    )
    down = decide(spec, round_number=2, primary={"new_model": look(-0.03, -0.004, p=0.01)})
    up = decide(spec, round_number=2, primary={"new_model": look(0.004, 0.03, p=0.01)})
    assert (down.action, up.action) == (Action.STOP_SUCCESS, Action.STOP_HARM)


def test_a_guardrail_breach_stops_and_says_which_metric_arm_and_limit() -> None:
    decision = decide(
        SPEC,
        round_number=5,
        primary={"new_model": NEUTRAL},
        guardrails={"latency_ms": {"new_model": look(5.5, 9.5)}},
    )
    assert decision.action is Action.STOP_HARM
    assert (decision.arm, decision.metric) == ("new_model", "latency_ms")
    assert decision.reason == (
        "guardrail latency_ms breached by new_model: it rose by +7.5 vs control, and with 95.0% "
        "confidence by more than the allowed 5 (95.0% confidence sequence [+5.5, +9.5])"
    )
    fell = decide(
        SPEC,
        round_number=5,
        primary={"new_model": NEUTRAL},
        guardrails={"retention": {"new_model": look(-0.05, -0.02)}},
    )
    assert fell.action is Action.STOP_HARM and "guardrail retention breached" in fell.reason
    assert "fell by -0.035" in fell.reason


def test_a_guardrail_is_not_breached_while_its_interval_reaches_the_limit() -> None:
    # Significantly worse than control, the estimate even beyond the limit, but the interval
    # still reaches the allowed limit: harm is not proven.
    decision = decide(
        SPEC,
        round_number=5,
        primary={"new_model": NEUTRAL},
        guardrails={
            "latency_ms": {"new_model": look(4.0, 7.0, p=0.001)},
            "retention": {"new_model": look(-0.03, -0.008, p=0.001)},
        },
    )
    assert decision.action is Action.CONTINUE


def test_harm_wins_over_success() -> None:
    decision = decide(
        SPEC,
        round_number=5,
        primary={"new_model": look(0.004, 0.03, p=0.001)},
        guardrails={"latency_ms": {"new_model": look(6.0, 8.0)}},
    )
    assert decision.action is Action.STOP_HARM


def test_a_sample_ratio_mismatch_invalidates_everything_else() -> None:
    decision = decide(
        SPEC,
        round_number=5,
        primary={"new_model": look(0.004, 0.03, p=0.001)},
        srm=srm_check([10_400, 9_600], [0.5, 0.5]),
    )
    assert decision.action is Action.STOP_INVALID
    assert decision.reason.startswith(
        "assignment is broken, results cannot be trusted: sample ratio mismatch"
    )
    healthy = decide(
        SPEC,
        round_number=5,
        primary={"new_model": NEUTRAL},
        srm=srm_check([5010, 4990], [0.5, 0.5]),
    )
    assert healthy.action is Action.CONTINUE


def test_an_empty_confidence_sequence_is_invalid() -> None:
    decision = decide(SPEC, round_number=5, primary={"new_model": look(0.02, 0.01, p=0.001)})
    assert (
        decision.action is Action.STOP_INVALID and "confidence sequence is empty" in decision.reason
    )


def test_the_horizon_stops_with_the_final_statistics() -> None:
    decision = decide(SPEC, round_number=10, primary={"new_model": look(-0.01, 0.02, p=0.4)})
    assert decision.action is Action.STOP_HORIZON
    assert decision.reason.startswith(
        "horizon of 10 rounds reached without a significant difference on accuracy: new_model +0.005"
    )


def test_several_treatments_are_each_held_to_a_bonferroni_alpha() -> None:
    spec = parse_experiment_spec(
        {
            **RAW,
            "arms": [
                {"name": n, "weight": w} for n, w in (("control", 0.4), ("a", 0.3), ("b", 0.3))
            ],
        }
    )
    assert spec.comparison_alpha == pytest.approx(0.025)
    weak = look(0.001, 0.03, p=0.03, alpha=0.025)
    assert (
        decide(spec, round_number=2, primary={"a": weak, "b": look(-1, 1, alpha=0.025)}).action
        is Action.CONTINUE
    )
    strong = look(0.001, 0.03, p=0.02, alpha=0.025)
    assert (
        decide(spec, round_number=2, primary={"a": look(-0.01, 0.01, alpha=0.025), "b": strong}).arm
        == "b"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"primary": {"control": NEUTRAL}}, "not a treatment arm"),
        ({"primary": {"new_model": look(-1, 1, alpha=0.1)}}, "computed at alpha 0.1"),
        ({"primary": {}, "guardrails": {"loss": {"new_model": NEUTRAL}}}, "not a guardrail"),
        ({"primary": {}, "round_number": 0}, "round_number"),
    ],
)
def test_inputs_the_rule_cannot_vouch_for_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide(SPEC, **{"round_number": 1, **kwargs})


def _run(spec: ExperimentSpec, latency_effect: float, seed: int) -> tuple[int, Action, str]:
    """Rounds of 40 new devices per arm; per-device accuracy and latency; fold and decide."""
    rng = np.random.default_rng(seed)
    alpha = spec.comparison_alpha
    arms: dict[str, tuple[list[float], list[float]]] = {"control": ([], []), "new_model": ([], [])}
    primary = guard = None
    for round_number in range(1, spec.horizon_rounds + 1):
        for name, (acc, lat) in arms.items():
            acc.extend(rng.normal(0.8, 0.05, 40))
            lat.extend(
                rng.normal(50.0 + (latency_effect if name == "new_model" else 0.0), 10.0, 40)
            )
        stats = {
            n: (ArmStats.from_values(a), ArmStats.from_values(lat)) for n, (a, lat) in arms.items()
        }
        primary = always_valid_look(
            difference_in_means(stats["control"][0], stats["new_model"][0]),
            tau=spec.tau,
            alpha=alpha,
            previous=primary,
        )
        guard = always_valid_look(
            difference_in_means(stats["control"][1], stats["new_model"][1]),
            tau=5.0,
            alpha=alpha,
            previous=guard,
        )
        decision = decide(
            spec,
            round_number=round_number,
            primary={"new_model": primary},
            guardrails={"latency_ms": {"new_model": guard}},
        )
        if decision.stops:
            return round_number, decision.action, decision.reason
    raise AssertionError("the horizon must stop the experiment")


def test_end_to_end_a_latency_regression_stops_the_experiment_before_the_horizon() -> None:
    # +12 ms against an allowed +5 ms, sd 10 per device: after r rounds the difference has
    # sd sqrt(2 * 100 / (40 r)); the breach is provable within a few rounds.
    spec = parse_experiment_spec({**RAW, "horizon_rounds": 30})
    rounds, action, reason = _run(spec, latency_effect=12.0, seed=4)
    assert action is Action.STOP_HARM and rounds < 30
    assert reason.startswith("guardrail latency_ms breached by new_model")
    # Without the regression the same experiment runs to its horizon.
    rounds, action, _ = _run(spec, latency_effect=0.0, seed=4)
    assert (rounds, action) == (30, Action.STOP_HORIZON)
