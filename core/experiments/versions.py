"""An experiment between model versions, run as an evaluation task: from the round metrics an
evaluation releases (:func:`core.evaluation.summary.round_metrics`) to the arms' statistics,
the comparisons with the control and the stop decision, after every round.

Each device of an experiment evaluates only its arm's version (:class:`core.evaluation.plan.
ArmAssignment`), so a round's summed reports give, per arm, the device count ``K`` and the
device-weighted mean and standard error of every metric: ``K``, ``sum(x)`` and ``sum(x^2)``
are recovered from them exactly (``sum(x) = K mean``, ``sum(x^2) = K (K - 1) se^2 + K
mean^2``; one device: ``sum(x^2) = mean^2``) and added up over the committed rounds. Each
look (one per round) compares the cumulative arms:

* the sample-ratio check (:func:`~core.experiments.srm.srm_check`) on the devices per arm;
  with per-stratum splits (``strata``), :func:`~core.experiments.srm.stratified_srm_check`
  on the devices per stratum and arm, which the evaluation releases as counts
  (:func:`strata_key`; the coordinator knows each reporting device's declared stratum and
  its arm), so the expected shares follow the strata actually seen;
* per treatment and metric (the primary one, each guardrail) the difference of device means,
  folded into an always-valid result (:func:`~core.experiments.sequential.
  always_valid_look`; ``alpha = spec.comparison_alpha``, ``tau = spec.tau`` for the primary
  metric, a guardrail's own limit, or ``tau`` for a zero limit, as in the simulations),
  and Welch's fixed-horizon test alongside (for reference: valid at the horizon only);
* :func:`~core.experiments.decision.decide`; the first look that stops is final.

**CUPED** (an experiment whose primary metric has a ``<metric>@<arm>`` covariate,
:attr:`~core.experiments.spec.PrimaryMetric.covariate_arm`): every device also evaluates
that arm's model, and its primary metric there, c, is its covariate; the released
``cov_sum``, ``cov_sq`` and ``cov_cross`` (sums of c, c^2 and c x per arm) give each arm's
:class:`~core.experiments.sequential.PairedSums`, and the primary comparison is made on the
CUPED-adjusted values (:func:`~core.experiments.sequential.cuped_from_sums`, theta and the
covariate's mean pooled over the arms at each look). Why it is sound: c is a function of the
device's own data (every device computes it, whatever its arm), so it is independent of the
assignment and the adjusted difference stays unbiased; it is strongly correlated with x (the
same data under a related model), which is what cuts the variance (by 1 - corr^2). theta is
re-estimated at each look from all devices so far: the usual plug-in, whose error vanishes
as the arms grow (the always-valid guarantee is asymptotic in it, as it is in the plug-in
variances). Guardrails are compared unadjusted.

**Strata and the pooled comparison**: with per-stratum splits the arms' means are pooled
over strata in different proportions (a stratum at 10% treatment weighs less in the
treatment arm than in the control). Where the metric differs between strata, the pooled
difference then mixes the treatment effect with the strata's difference: it estimates the
effect only when the metric's stratum means are equal, or the splits are. The comparisons
here are pooled (the released sums are per arm, not per stratum and arm); read them with
that in mind, or give every stratum the same split and use strata only to exclude
(weight 0), which changes the population, not the mix. The sample-ratio check is per
stratum and valid either way.

**Assumption**: every round's reports are new draws of devices. A device that reports in
several rounds counts once per round (the sums cannot tell devices apart: under secure
aggregation no one can), which understates the standard errors when the same devices come
back round after round; give an experiment a population well above ``clients_per_round``.

Pure functions over plain mappings: the coordinator runs :func:`analyze` after each commit
on the stored round metrics (so a restart changes nothing), and ``fedctl experiment status``
runs it again on what it fetched to print the table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.experiments.decision import Action, Decision, decide
from core.experiments.sequential import (
    AlwaysValidResult,
    ArmStats,
    FixedHorizonResult,
    PairedSums,
    always_valid_look,
    cuped_from_sums,
    difference_in_means,
    welch_test,
)
from core.experiments.spec import ExperimentSpec
from core.experiments.srm import SrmResult, srm_check, stratified_srm_check

#: Round metrics an experiment adds, ``experiment.<...>``; ``experiment.action`` is the index
#: of the decision's :class:`Action` in :data:`ACTIONS`.
PREFIX = "experiment"
ACTIONS = tuple(Action)
#: The stratum label of the devices on the default split (no stratum, or one the spec does
#: not name); not a stratum name a device can declare.
DEFAULT_STRATUM = "*"


def strata_key(label: str, version: int) -> str:
    """The round metric counting the reporting devices of stratum ``label`` (a name of
    ``spec.strata``, or :data:`DEFAULT_STRATUM`) that evaluated ``version`` (their arm's)."""
    return f"eval.strata.{label}.v{version}.devices"


def stratum_label(spec: ExperimentSpec, stratum: str | None) -> str:
    """The label a device declaring ``stratum`` is counted under: the stratum's name when
    the spec gives it a split, otherwise :data:`DEFAULT_STRATUM`."""
    return stratum if stratum is not None and stratum in spec.strata else DEFAULT_STRATUM


def _split_weights(spec: ExperimentSpec) -> dict[str, tuple[float, ...]]:
    return {DEFAULT_STRATUM: tuple(a.weight for a in spec.arms), **spec.strata}


def round_strata(spec: ExperimentSpec, metrics: Mapping[str, float]) -> dict[str, list[int]]:
    """Per stratum label, the devices per arm of one round (:func:`strata_key`); empty for
    a spec without strata."""
    if not spec.strata:
        return {}
    return {label: [max(0, round(metrics.get(strata_key(label, a.version or 0), 0.0)))
                    for a in spec.arms]
            for label in _split_weights(spec)}


@dataclass(frozen=True)
class Sums:
    """One arm's device count, sum and sum of squares of one metric's device values."""

    count: int
    total: float
    squares: float

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.count + other.count, self.total + other.total,
                    self.squares + other.squares)

    def stats(self) -> ArmStats:
        return ArmStats.from_sums(self.count, self.total, self.squares)


@dataclass(frozen=True)
class Comparison:
    """One treatment against the control on one metric, at the latest look."""

    arm: str
    metric: str
    always_valid: AlwaysValidResult
    fixed_horizon: FixedHorizonResult | None


@dataclass(frozen=True)
class ArmSummary:
    name: str
    version: int
    devices: int
    metrics: Mapping[str, ArmStats]


@dataclass(frozen=True)
class ExperimentState:
    """The experiment after ``rounds`` looks (or at the look that stopped it);
    ``cuped_theta``: the CUPED slope the primary comparisons used (NaN without a
    covariate)."""

    rounds: int
    arms: tuple[ArmSummary, ...]
    comparisons: tuple[Comparison, ...]
    srm: SrmResult
    decision: Decision
    cuped_theta: float = math.nan


def metric_names(spec: ExperimentSpec) -> tuple[str, ...]:
    """The primary metric, then the guardrails'."""
    names = [spec.primary.name]
    names += [g.metric for g in spec.guardrails if g.metric not in names]
    return tuple(names)


def round_sums(spec: ExperimentSpec, metrics: Mapping[str, float]
               ) -> dict[str, dict[str, Sums]]:
    """Per arm and metric, the sums of one round's released metrics (an arm whose version
    no device evaluated has count 0). Raises ``ValueError`` for an arm without a version."""
    out: dict[str, dict[str, Sums]] = {}
    for arm in spec.arms:
        if arm.version is None:
            raise ValueError(f"arm {arm.name!r} names no model version")
        base = f"eval.v{arm.version}"
        k = max(0, round(metrics.get(f"{base}.devices", 0.0)))
        per_metric: dict[str, Sums] = {}
        for name in metric_names(spec):
            mean = metrics.get(f"{base}.{name}.device_mean")
            if k == 0 or mean is None:
                per_metric[name] = Sums(0, 0.0, 0.0)
                continue
            se = metrics.get(f"{base}.{name}.device_se", 0.0) if k > 1 else 0.0
            per_metric[name] = Sums(k, k * mean, k * (k - 1) * se * se + k * mean * mean)
        out[arm.name] = per_metric
    return out


def round_covariates(spec: ExperimentSpec, metrics: Mapping[str, float]
                     ) -> dict[str, PairedSums]:
    """Per arm, the primary metric's :class:`PairedSums` of one round (its covariate's sums
    released as ``cov_*``); empty without a ``<metric>@<arm>`` covariate."""
    if spec.primary.covariate_arm is None:
        return {}
    name = spec.primary.name
    out = {}
    for arm, per_metric in round_sums(spec, metrics).items():
        y = per_metric[name]
        base = f"eval.v{_arm_version(spec, arm)}.{name}"
        x, xx, xy = (metrics.get(f"{base}.{f}", 0.0) if y.count else 0.0
                     for f in ("cov_sum", "cov_sq", "cov_cross"))
        out[arm] = PairedSums(y.count, y.total, y.squares, x, xx, xy)
    return out


def _arm_version(spec: ExperimentSpec, name: str) -> int | None:
    return next(a.version for a in spec.arms if a.name == name)


def analyze(spec: ExperimentSpec, rounds: Sequence[Mapping[str, float]]) -> ExperimentState:
    """The state after the committed ``rounds`` (their metrics, in order; at least one): the
    looks are folded round by round, and the first stopping decision is kept (the rounds
    after it, if any, are ignored). Raises ``ValueError`` with no round."""
    if not rounds:
        raise ValueError("an experiment's state needs at least one committed round")
    names = metric_names(spec)
    zero = {name: Sums(0, 0.0, 0.0) for name in names}
    cumulative = {arm.name: dict(zero) for arm in spec.arms}
    looks: dict[tuple[str, str], AlwaysValidResult] = {}
    paired = {arm.name: PairedSums(0, 0.0, 0.0, 0.0, 0.0, 0.0) for arm in spec.arms}
    strata = {label: [0] * len(spec.arms) for label in _split_weights(spec)} if spec.strata \
        else {}
    state: ExperimentState | None = None
    for number, metrics in enumerate(rounds, start=1):
        for label, counts in round_strata(spec, metrics).items():
            strata[label] = [a + b for a, b in zip(strata[label], counts, strict=True)]
        for arm, per_metric in round_sums(spec, metrics).items():
            for name, sums in per_metric.items():
                cumulative[arm][name] = cumulative[arm][name] + sums
        for arm, pair in round_covariates(spec, metrics).items():
            paired[arm] = paired[arm] + pair
        state = _look(spec, number, cumulative, looks,
                      paired if spec.primary.covariate_arm is not None else None, strata)
        if state.decision.stops:
            return state
    assert state is not None
    return state


def _tau(spec: ExperimentSpec, metric: str) -> float:
    for rail in spec.guardrails:
        if rail.metric == metric and metric != spec.primary.name:
            return rail.limit if rail.limit > 0 else spec.tau
    return spec.tau


def _look(spec: ExperimentSpec, number: int, cumulative: Mapping[str, Mapping[str, Sums]],
          looks: dict[tuple[str, str], AlwaysValidResult],
          paired: Mapping[str, PairedSums] | None = None,
          strata: Mapping[str, Sequence[int]] | None = None) -> ExperimentState:
    primary_name = spec.primary.name
    adjusted: dict[str, ArmStats] = {}
    theta = math.nan
    if paired is not None and sum(p.count for p in paired.values()) >= 2:
        cuped = cuped_from_sums([paired[a.name] for a in spec.arms])
        theta = cuped.theta
        adjusted = {a.name: s for a, s in zip(spec.arms, cuped.arms, strict=True)}
    devices = [cumulative[a.name][primary_name].count for a in spec.arms]
    if strata:
        srm = stratified_srm_check(strata, _split_weights(spec), threshold=spec.srm_threshold)
    else:
        srm = srm_check(devices, [a.weight for a in spec.arms], threshold=spec.srm_threshold)
    comparisons: list[Comparison] = []
    primary: dict[str, AlwaysValidResult] = {}
    rails: dict[str, dict[str, AlwaysValidResult]] = {}
    for name in metric_names(spec):
        control = cumulative[spec.control][name].stats()
        if name == primary_name and adjusted:
            control = adjusted[spec.control]
        for arm in spec.treatments:
            treatment = cumulative[arm][name].stats()
            if name == primary_name and adjusted:
                treatment = adjusted[arm]
            if control.count < 2 or treatment.count < 2:
                continue  # no variance yet: no look
            diff = difference_in_means(control, treatment)
            result = always_valid_look(diff, tau=_tau(spec, name),
                                       alpha=spec.comparison_alpha,
                                       previous=looks.get((arm, name)))
            looks[(arm, name)] = result
            fixed = welch_test(control, treatment, alpha=spec.comparison_alpha)
            comparisons.append(Comparison(arm, name, result, fixed))
            if name == primary_name:
                primary[arm] = result
            if any(g.metric == name for g in spec.guardrails):
                rails.setdefault(name, {})[arm] = result
    decision = decide(spec, round_number=number, primary=primary, guardrails=rails, srm=srm)
    arms = tuple(
        ArmSummary(a.name, a.version if a.version is not None else -1,
                   cumulative[a.name][primary_name].count,
                   {name: sums.stats() for name, sums in cumulative[a.name].items()})
        for a in spec.arms)
    return ExperimentState(number, arms, tuple(comparisons), srm, decision, theta)


def state_metrics(state: ExperimentState) -> dict[str, float]:
    """The state as flat round metrics ``experiment.<...>`` (non-finite values left out):
    the decision's action index, the SRM p-value, per arm its devices and metric means, per
    comparison the estimate, the always-valid p-value and interval and Welch's p-value."""
    out: dict[str, float] = {
        f"{PREFIX}.action": float(ACTIONS.index(state.decision.action)),
        f"{PREFIX}.srm_p": state.srm.p_value,
        f"{PREFIX}.cuped_theta": state.cuped_theta,
    }
    for arm in state.arms:
        out[f"{PREFIX}.{arm.name}.devices"] = float(arm.devices)
        for name, stats in arm.metrics.items():
            out[f"{PREFIX}.{arm.name}.{name}.mean"] = stats.mean
    for c in state.comparisons:
        base = f"{PREFIX}.{c.arm}.{c.metric}"
        av = c.always_valid
        out.update({f"{base}.diff": av.estimate, f"{base}.p_always_valid": av.p_value,
                    f"{base}.cs_lower": av.lower, f"{base}.cs_upper": av.upper})
        if c.fixed_horizon is not None:
            out[f"{base}.p_fixed_horizon"] = c.fixed_horizon.p_value
    return {k: v for k, v in out.items() if math.isfinite(v)}


def stop_reason(decision: Decision) -> str:
    """What a stopped experiment's task stores as its reason."""
    return (f"experiment decision {decision.action.value} after round "
            f"{decision.round_number}: {decision.reason}")


def state_to_json(spec: ExperimentSpec, state: ExperimentState) -> dict[str, Any]:
    """The state as JSON-ready data (``fedctl experiment status --out``)."""

    def number(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "rounds": state.rounds,
        "control": spec.control,
        "primary_metric": spec.primary.name,
        "alpha": spec.alpha,
        "comparison_alpha": spec.comparison_alpha,
        "decision": {"action": state.decision.action.value, "reason": state.decision.reason,
                     "round": state.decision.round_number, "arm": state.decision.arm,
                     "metric": state.decision.metric},
        "cuped_theta": number(state.cuped_theta),
        "srm": {"observed": list(state.srm.observed), "expected": list(state.srm.expected),
                "p_value": state.srm.p_value, "flagged": state.srm.flagged},
        "arms": [{"name": a.name, "version": a.version, **_source(spec, a.name),
                  "devices": a.devices,
                  "metrics": {name: {"mean": number(s.mean),
                                     "se": number(math.sqrt(s.variance / s.count))
                                     if s.count > 1 else None}
                              for name, s in a.metrics.items()}}
                 for a in state.arms],
        "comparisons": [
            {"arm": c.arm, "metric": c.metric,
             "difference": c.always_valid.estimate,
             "always_valid": {"p_value": c.always_valid.p_value,
                              "lower": number(c.always_valid.lower),
                              "upper": number(c.always_valid.upper)},
             "fixed_horizon": None if c.fixed_horizon is None else {
                 "p_value": c.fixed_horizon.p_value,
                 "lower": number(c.fixed_horizon.lower),
                 "upper": number(c.fixed_horizon.upper)}}
            for c in state.comparisons],
        "guardrails": [{"metric": g.metric, "harmful": g.harmful.value, "limit": g.limit}
                       for g in spec.guardrails],
    }


def _source(spec: ExperimentSpec, arm: str) -> dict[str, Any]:
    """Where an arm's model comes from, for an experiment whose arms name training tasks."""
    (found,) = [a for a in spec.arms if a.name == arm]
    if found.task is None:
        return {}
    return {"task": found.task, "task_version": found.task_version}
