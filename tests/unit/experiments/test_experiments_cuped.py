"""CUPED in a coordinator experiment, from the reports to the decision (pure, no network):
with a ``<metric>@<arm>`` covariate every device also evaluates that arm's model, its value
there fills the ``cov_*`` fields of its arm's block, the coordinator's check rebuilds them,
and the released sums give the CUPED-adjusted comparison: the same numbers as CUPED on the
devices' own values, and a much tighter confidence sequence than without the covariate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from core.evaluation import DeviceResult, EvaluationLayout, device_vector
from core.evaluation.plan import EvaluationPlan, plan_for
from core.evaluation.report import report_problem
from core.evaluation.summary import round_metrics, summarize
from core.experiments import ExperimentSpecError
from core.experiments.sequential import ArmStats, always_valid_look, cuped_arms, difference_in_means
from core.experiments.spec import parse_experiment_spec
from core.experiments.versions import analyze, state_metrics
from core.types import FederatedEvaluation


def experiment(covariate: str | None) -> dict[str, object]:
    primary: dict[str, object] = {"name": "accuracy", "direction": "increase"}
    if covariate is not None:
        primary["covariate"] = covariate
    return {"arms": [{"name": "control", "weight": 0.5, "version": 0},
                     {"name": "candidate", "weight": 0.5, "version": 1}],
            "primary_metric": primary, "mde": 0.02, "alpha": 0.05, "horizon_rounds": 5,
            "salt": "cuped-salt"}


def plan(covariate: str | None) -> EvaluationPlan:
    spec = parse_experiment_spec(experiment(covariate))
    return plan_for(FederatedEvaluation(max_examples=64, experiment=spec), (0, 1))


def test_the_covariate_arm_is_parsed_and_checked() -> None:
    spec = parse_experiment_spec(experiment("accuracy@control"))
    assert spec.primary.covariate_arm == "control"
    assert parse_experiment_spec(experiment("accuracy_pre")).primary.covariate_arm is None
    with pytest.raises(ExperimentSpecError) as info:
        parse_experiment_spec(experiment("accuracy@nobody"))
    assert info.value.field == "primary_metric.covariate"
    with pytest.raises(ExperimentSpecError, match="is the primary metric there"):
        parse_experiment_spec(experiment("loss@control"))


def test_the_plan_carries_the_covariate_version_and_a_plan_without_one_is_unchanged() -> None:
    with_cov = plan("accuracy@control")
    assert with_cov.assignment is not None and with_cov.assignment.covariate == 0
    assert EvaluationPlan.from_json(with_cov.to_json()) == with_cov
    assert "covariate" not in plan(None).to_json()
    for i in range(20):
        device = f"d{i}"
        mine = with_cov.version_for(device)
        assert with_cov.versions_for(device) == ((0,) if mine == 0 else (1, 0))
    assert EvaluationLayout(with_cov).length == EvaluationLayout(plan(None)).length + 2 * 2 * 3


def results(version: int, accuracy: float, covariate: float | None) -> dict[int, DeviceResult]:
    out = {version: DeviceResult(20, {"accuracy": accuracy, "loss": 1.0})}
    if covariate is not None:
        out[0] = DeviceResult(20, {"accuracy": covariate, "loss": 1.2})
    return out


def test_a_device_reports_its_covariate_in_its_arms_block_and_the_check_rebuilds_it() -> None:
    layout = EvaluationLayout(plan("accuracy@control"))
    treated = next(f"d{i}" for i in range(50) if layout.plan.version_for(f"d{i}") == 1)
    control = next(f"d{i}" for i in range(50) if layout.plan.version_for(f"d{i}") == 0)
    v = device_vector(layout, results(1, 0.8, 0.6))
    assert v[layout.index(1, "accuracy", "cov_sum")] == 0.6
    assert v[layout.index(1, "accuracy", "cov_cross")] == pytest.approx(0.48)
    assert v[layout.index(0, "", "devices")] == 0.0  # the covariate counts in no other arm
    assert report_problem(layout, v, device_id=treated) is None
    # A control device's covariate is its own value.
    own = device_vector(layout, results(0, 0.7, None))
    assert own[layout.index(0, "accuracy", "cov_sum")] == 0.7
    assert report_problem(layout, own, device_id=control) is None
    tampered = v.copy()
    tampered[layout.index(1, "accuracy", "cov_cross")] = 0.9
    assert "accuracy.cov_cross" in (report_problem(layout, tampered) or "")
    tampered = own.copy()
    tampered[layout.index(0, "accuracy", "cov_sum")] = 0.1  # a control device's c is its x
    assert report_problem(layout, tampered) is not None
    with pytest.raises(ValueError, match="and the covariate version 0"):
        device_vector(layout, {1: DeviceResult(20, {"accuracy": 0.8, "loss": 1.0})})


def run(covariate: str | None, devices: int, effect: float, seed: int
        ) -> tuple[dict[str, float], list[np.ndarray], list[np.ndarray]]:
    """One round of ``devices`` devices: device i's accuracy under the control's model is
    its ability a_i (spread widely), under the candidate's a_i + effect + small noise. The
    round's released metrics, and per arm the devices' y and covariate values."""
    layout = EvaluationLayout(plan(covariate))
    rng = np.random.default_rng(seed)
    total = np.zeros(layout.length)
    ys: list[list[float]] = [[], []]
    xs: list[list[float]] = [[], []]
    for i in range(devices):
        device = f"device-{i}"
        arm = layout.plan.version_for(device)
        assert arm is not None
        ability = float(rng.uniform(0.3, 0.7))
        y = ability if arm == 0 else ability + effect + float(rng.normal(0, 0.01))
        total += device_vector(layout, results(arm, y, ability if arm == 1 and covariate
                                               else None))
        ys[arm].append(y)
        xs[arm].append(ability)
    metrics = round_metrics(summarize(layout, total, ()))
    return metrics, [np.array(y) for y in ys], [np.array(x) for x in xs]


def test_cuped_from_the_released_sums_equals_cuped_on_the_devices_and_is_far_tighter(
        ) -> None:
    spec = parse_experiment_spec(experiment("accuracy@control"))
    metrics, ys, xs = run("accuracy@control", 60, 0.03, seed=1)
    state = analyze(spec, [metrics])
    (primary,) = [c for c in state.comparisons if c.metric == "accuracy"]
    direct = cuped_arms(ys, xs)
    expected = always_valid_look(
        difference_in_means(*(ArmStats.from_values(a) for a in direct.adjusted)),
        tau=spec.tau, alpha=spec.comparison_alpha)
    assert state.cuped_theta == pytest.approx(direct.theta, rel=1e-4)
    assert primary.always_valid.estimate == pytest.approx(expected.estimate, abs=1e-4)
    assert primary.always_valid.upper - primary.always_valid.lower == pytest.approx(
        expected.upper - expected.lower, rel=1e-3)
    assert state_metrics(state)["experiment.cuped_theta"] == pytest.approx(direct.theta,
                                                                           rel=1e-4)
    # Without the covariate the same devices' comparison is several times wider: the
    # devices' abilities (spread 0.3 to 0.7) swamp a 0.03 effect; CUPED removes them.
    plain = analyze(parse_experiment_spec(experiment(None)),
                    [run(None, 60, 0.03, seed=1)[0]])
    (unadjusted,) = [c for c in plain.comparisons if c.metric == "accuracy"]
    width = primary.always_valid.upper - primary.always_valid.lower
    assert width * 4 < unadjusted.always_valid.upper - unadjusted.always_valid.lower
    assert primary.always_valid.lower <= 0.03 <= primary.always_valid.upper
    assert math.isnan(plain.cuped_theta)
    assert state.decision.action.value == "stop_success", state.decision.reason


@pytest.mark.slow  # two small simulations: 13 s of CPU, 40 s wall at load 12 on 2 cores
def test_a_simulated_experiment_with_the_same_covariate_is_tighter(tmp_path: Path) -> None:
    """The same ``accuracy@<arm>`` covariate in ``fedctl simulate``: each drawn device also
    evaluates that arm's model, and the primary comparison's confidence sequence is
    narrower than without it, round for round."""
    import yaml

    from simulations.experiment import load_experiment_file, run_experiment

    def widths(covariate: str | None) -> list[float]:
        primary: dict[str, object] = {"name": "accuracy", "direction": "increase"}
        if covariate is not None:
            primary["covariate"] = covariate
        path = tmp_path / f"ab-{covariate}.yaml"
        path.write_text(yaml.safe_dump({
            "name": "ab-cuped", "seed": 0, "rounds": 2, "clients_per_round": 10,
            "over_selection": 1.0, "min_reports": 5,
            "model": {"architecture": "logistic_regression",
                      "arguments": {"input_dim": 64, "num_classes": 10}},
            "local": {"epochs": 1, "batch_size": 10, "optimizer": "sgd",
                      "learning_rate": 0.05},
            "simulation": {"population": {"devices": 30, "data": "digits:dirichlet=0.3"},
                           "experiment": {
                "arms": [{"name": "short", "weight": 0.5, "trained_rounds": 1},
                         {"name": "long", "weight": 0.5, "trained_rounds": 2}],
                "primary_metric": primary, "mde": 0.5, "alpha": 0.05,
                "horizon_rounds": 2, "salt": "s", "devices_per_round": 10}}}))
        history = run_experiment(*load_experiment_file(path))
        return [h.primary["long"].upper - h.primary["long"].lower for h in history
                if "long" in h.primary]

    plain, cuped = widths(None), widths("accuracy@short")
    assert plain and len(cuped) == len(plain)
    assert all(c < p for c, p in zip(cuped, plain, strict=True)), (cuped, plain)
