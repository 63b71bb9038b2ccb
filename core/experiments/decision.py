"""Stop rules: after each round, continue or stop, and say why in words a person can act on.

Checked in this order, the first that applies wins:

1. **Invalid** (:attr:`Action.STOP_INVALID`): the sample-ratio check flagged the assignment,
   or a confidence sequence became empty (the looks contradict the model). No comparison
   can be trusted, so neither success nor harm is claimed.
2. **Harm** (:attr:`Action.STOP_HARM`): a guardrail's confidence sequence for
   treatment - control lies wholly beyond its allowed limit in the harmful direction, or the
   primary metric is proven to move the wrong way (always-valid p < alpha with the interval
   on the bad side). Harm comes before success: a winning variant that breaks a guardrail
   is not shipped.
3. **Success** (:attr:`Action.STOP_SUCCESS`): the primary metric's always-valid p-value is
   below the per-comparison alpha and its confidence sequence lies on the wanted side of 0.
4. **Horizon** (:attr:`Action.STOP_HORIZON`): the planned number of rounds is reached.
5. Otherwise :attr:`Action.CONTINUE`.

With several treatment arms each is compared with the control at ``alpha / (arms - 1)``
(:attr:`ExperimentSpec.comparison_alpha`), and the first arm that triggers a stop stops the
experiment (shutting off one arm and going on is left to the caller). Guardrails are checked
at that same alpha each: more guardrails mean more chances of a false harm stop, the safe
side to err on.

The inputs are :class:`~core.experiments.sequential.AlwaysValidResult` values the caller
folded round by round (``always_valid_look``) with ``alpha=spec.comparison_alpha`` and
``tau=spec.tau`` for the primary metric; a result made with another alpha is refused
(``ValueError``), because the guarantee of the stop rule rests on it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from core.experiments.sequential import AlwaysValidResult
from core.experiments.spec import Direction, ExperimentSpec
from core.experiments.srm import SrmResult


class Action(enum.Enum):
    CONTINUE = "continue"
    STOP_SUCCESS = "stop_success"
    STOP_HARM = "stop_harm"
    STOP_HORIZON = "stop_horizon"
    STOP_INVALID = "stop_invalid"


@dataclass(frozen=True)
class Decision:
    """What to do after ``round_number`` rounds; ``arm`` and ``metric`` name the comparison
    that decided, when one did."""

    action: Action
    reason: str
    round_number: int
    arm: str | None = None
    metric: str | None = None

    @property
    def stops(self) -> bool:
        return self.action is not Action.CONTINUE


def decide(
    spec: ExperimentSpec,
    *,
    round_number: int,
    primary: Mapping[str, AlwaysValidResult],
    guardrails: Mapping[str, Mapping[str, AlwaysValidResult]] | None = None,
    srm: SrmResult | None = None,
) -> Decision:
    """The decision after ``round_number`` (>= 1) completed rounds.

    ``primary`` maps each treatment arm to its comparison with the control on the primary
    metric; ``guardrails`` maps a guardrail metric to such a mapping (a guardrail or arm
    without data yet may be missing). Raises ``ValueError`` for unknown arms or metrics, or
    a result made with another alpha than ``spec.comparison_alpha``.
    """
    if round_number < 1:
        raise ValueError(f"round_number must be >= 1, got {round_number}")
    guardrails = guardrails or {}
    alpha = spec.comparison_alpha
    treatments = spec.treatments
    by_metric = {g.metric: g for g in spec.guardrails}
    for arm, result in primary.items():
        _check(arm, result, treatments, alpha, spec.primary.name)
    for metric, per_arm in guardrails.items():
        if metric not in by_metric:
            raise ValueError(f"{metric!r} is not a guardrail of this experiment")
        for arm, result in per_arm.items():
            _check(arm, result, treatments, alpha, metric)

    if srm is not None and srm.flagged:
        return Decision(
            Action.STOP_INVALID,
            f"assignment is broken, results cannot be trusted: {srm.describe()}",
            round_number,
        )
    for metric, per_arm in [(spec.primary.name, primary), *guardrails.items()]:
        for arm, result in per_arm.items():
            if result.lower > result.upper:
                return Decision(
                    Action.STOP_INVALID,
                    f"{metric} for {arm}: the confidence sequence is empty "
                    f"({_interval(result)}), so the effect is not constant or devices are "
                    "not independent; results cannot be trusted",
                    round_number,
                    arm,
                    metric,
                )

    for metric, per_arm in guardrails.items():
        rail = by_metric[metric]
        for arm, result in per_arm.items():
            if rail.harmful is Direction.INCREASE and result.lower > rail.limit:
                return Decision(
                    Action.STOP_HARM,
                    f"guardrail {metric} breached by {arm}: it rose by {result.estimate:+.4g} "
                    f"vs {spec.control}, and with {1 - alpha:.1%} confidence by more than the "
                    f"allowed {rail.limit:.4g} ({_interval(result)})",
                    round_number,
                    arm,
                    metric,
                )
            if rail.harmful is Direction.DECREASE and result.upper < -rail.limit:
                return Decision(
                    Action.STOP_HARM,
                    f"guardrail {metric} breached by {arm}: it fell by {result.estimate:+.4g} "
                    f"vs {spec.control}, and with {1 - alpha:.1%} confidence by more than the "
                    f"allowed {rail.limit:.4g} ({_interval(result)})",
                    round_number,
                    arm,
                    metric,
                )

    wanted_up = spec.primary.direction is Direction.INCREASE
    name = spec.primary.name
    for arm, result in primary.items():
        if result.p_value < alpha and (result.upper < 0.0 if wanted_up else result.lower > 0.0):
            return Decision(
                Action.STOP_HARM,
                f"primary metric {name} is worse for {arm} than {spec.control}: "
                f"{result.estimate:+.4g} ({_interval(result)}, always-valid "
                f"p={result.p_value:.3g} < {alpha:.3g})",
                round_number,
                arm,
                name,
            )
    for arm, result in primary.items():
        if result.p_value < alpha and (result.lower > 0.0 if wanted_up else result.upper < 0.0):
            return Decision(
                Action.STOP_SUCCESS,
                f"{arm} beats {spec.control} on {name}: {result.estimate:+.4g} "
                f"({_interval(result)}, always-valid p={result.p_value:.3g} < {alpha:.3g})",
                round_number,
                arm,
                name,
            )

    if round_number >= spec.horizon_rounds:
        summary = "; ".join(
            f"{arm} {r.estimate:+.4g} ({_interval(r)}, p={r.p_value:.3g})"
            for arm, r in primary.items()
        )
        return Decision(
            Action.STOP_HORIZON,
            f"horizon of {spec.horizon_rounds} rounds reached without a significant "
            f"difference on {name}" + (f": {summary}" if summary else ""),
            round_number,
        )
    return Decision(
        Action.CONTINUE,
        f"round {round_number} of {spec.horizon_rounds}: no stop rule met",
        round_number,
    )


def _check(
    arm: str, result: AlwaysValidResult, treatments: tuple[str, ...], alpha: float, metric: str
) -> None:
    if arm not in treatments:
        raise ValueError(f"{arm!r} is not a treatment arm (treatments: {list(treatments)})")
    if abs(result.alpha - alpha) > 1e-12:
        raise ValueError(
            f"{metric} for {arm} was computed at alpha {result.alpha}, the stop rule needs {alpha}"
        )


def _interval(result: AlwaysValidResult) -> str:
    return f"{1 - result.alpha:.1%} confidence sequence [{result.lower:+.4g}, {result.upper:+.4g}]"
