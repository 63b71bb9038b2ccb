"""A/B experiments of model variants on simulated devices (simulations.experiment): arms are
sticky, a known-better arm wins and says why, an A/A test does not, a guardrail breach
stops with its reason, and a bad `simulation.experiment` field is a CLI error naming file and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from core.experiments import Action
from fedctl.main import main
from simulations.experiment import (
    ExperimentRunner,
    format_table,
    load_experiment_file,
    run_experiment,
)

# digits (1,797 examples) across 30 devices: about 12 held-out examples each.
TASK = {
    "name": "ab-tiny",
    "seed": 0,
    "model": {"architecture": "logistic_regression",
              "arguments": {"input_dim": 64, "num_classes": 10}},
    "rounds": 10,
    "clients_per_round": 10,
    "over_selection": 1.0,
    "min_reports": 5,
    "local": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.05},
}
POPULATION = {"devices": 30, "data": "digits:dirichlet=100"}


def _experiment(short: int, long: int, **extra: object) -> dict[str, object]:
    return {
        "arms": [{"name": "short", "weight": 0.5, "trained_rounds": short},
                 {"name": "long", "weight": 0.5, "trained_rounds": long}],
        "primary_metric": {"name": "accuracy", "direction": "increase"},
        "mde": 0.1, "alpha": 0.05, "horizon_rounds": 8, "salt": "test-salt",
        "devices_per_round": 8, **extra,
    }


def _write(tmp_path: Path, experiment: object) -> Path:
    path = tmp_path / "ab.yaml"
    simulation = {"population": POPULATION, "experiment": experiment}
    path.write_text(yaml.safe_dump({**TASK, "simulation": simulation}), encoding="utf-8")
    return path


def test_each_device_keeps_its_arm_in_every_round(tmp_path: Path) -> None:
    runner = ExperimentRunner(*load_experiment_file(_write(tmp_path, _experiment(0, 0))))
    devices = runner.eligible
    first = runner.assign(devices)
    history = list(runner.rounds())
    assert len(history) == 8  # A/A, no stop before the horizon
    # The arms the rounds used are the assignment of the devices, and it never changes.
    assert (runner.assign(devices) == first).all()
    arm_of = {int(d): int(a) for d, a in zip(devices, first, strict=True)}
    used = runner.assigned
    assert used and all(arm_of[d] == a for d, a in used.items())
    assert 0 < sum(used.values()) < len(used)  # both arms got devices
    # A restart (a fresh runner, nothing carried over) assigns the same arms.
    again = ExperimentRunner(*load_experiment_file(_write(tmp_path, _experiment(0, 0))))
    assert (again.assign(devices) == first).all()


def test_a_known_better_arm_wins_and_the_reason_is_stored(tmp_path: Path) -> None:
    config, experiment = load_experiment_file(_write(tmp_path, _experiment(0, 10)))
    history = run_experiment(config, experiment)
    decision = history[-1].decision
    assert decision.action is Action.STOP_SUCCESS
    assert decision.arm == "long" and decision.metric == "accuracy"
    assert "long beats short on accuracy" in decision.reason
    assert all(not h.decision.stops for h in history[:-1])
    assert "stop_success" in format_table(experiment.spec, history)


def test_an_a_a_experiment_does_not_declare_success(tmp_path: Path) -> None:
    config, experiment = load_experiment_file(_write(tmp_path, _experiment(5, 5)))
    history = run_experiment(config, experiment)
    assert history[-1].decision.action is Action.STOP_HORIZON
    assert history[-1].decision.round_number == 8
    assert all(h.decision.action in (Action.CONTINUE, Action.STOP_HORIZON) for h in history)


def test_a_guardrail_breach_stops_with_its_reason(tmp_path: Path) -> None:
    # The untrained model as treatment: its loss is far above the trained control's.
    exp = _experiment(10, 0, guardrails=[{"metric": "loss", "max_increase": 0.1}])
    config, experiment = load_experiment_file(_write(tmp_path, exp))
    decision = run_experiment(config, experiment)[-1].decision
    assert decision.action is Action.STOP_HARM
    assert decision.metric == "loss" and decision.arm == "long"
    assert decision.reason.startswith("guardrail loss breached by long")


@pytest.mark.parametrize(("edit", "field"), [
    ({"alpha": 0.7}, "simulation.experiment.alpha"),
    ({"arms": [{"name": "a", "weight": 0.5, "trained_rounds": 1},
               {"name": "b", "weight": 0.6, "trained_rounds": 2}]}, "simulation.experiment.arms"),
    ({"arms": [{"name": "a", "weight": 0.5, "trained_rounds": 1},
               {"name": "b", "weight": 0.5}]}, "simulation.experiment.arms[1].trained_rounds"),
    ({"arms": [{"name": "a", "weight": 0.5, "trained_rounds": 1},
               {"name": "b", "weight": 0.5, "trained_rounds": 11}]},
     "simulation.experiment.arms[1].trained_rounds"),
    ({"primary_metric": {"name": "latency", "direction": "decrease"}},
     "simulation.experiment.primary_metric.name"),
    ({"guardrails": [{"metric": "loss", "max_increase": -1}]},
     "simulation.experiment.guardrails[0].max_increase"),
    ({"devices_per_round": 1}, "simulation.experiment.devices_per_round"),
    ({"salt": ""}, "simulation.experiment.salt"),
    ({"strata": {"low": {"short": 1.0}}}, "simulation.experiment.strata"),
    ({"colour": "red"}, "simulation.experiment.colour"),
])
def test_a_bad_experiment_field_is_a_cli_error_naming_file_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, object],
        field: str) -> None:
    path = _write(tmp_path, {**_experiment(0, 1), **edit})
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: field '{field}'" in err, err
    assert "Traceback" not in err


def test_the_cli_prints_the_decision_and_json_gives_one_object(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _experiment(0, 10))
    assert main(["simulate", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["decision"]["action"] == "stop_success"
    assert result["decision"]["arm"] == "long"
    assert len(result["rounds"]) == result["decision"]["round"]
    assert main(["simulate", str(path)]) == 0
    text = capsys.readouterr().out
    assert "ab-tiny: stop_success after" in text and "confidence sequence" in text


def test_the_example_file_is_a_valid_experiment() -> None:
    example = Path(__file__).resolve().parents[3] / "simulations" / "examples" / "ab_test.yaml"
    config, experiment = load_experiment_file(example)
    assert experiment.trained_rounds == (5, 30) and config.rounds == 30
    assert experiment.spec.treatments == ("long",)
