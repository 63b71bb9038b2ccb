"""A task file of kind ``evaluate`` runs in simulation (``fedctl simulate``): version N is the
task's model after N simulated training rounds, each round's drawn devices report with the
device agent's core code, and the round releases what the coordinator releases for the same
plan, under the same names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from coordinator.rounds.evaluation_aggregators import PlainEvaluation
from coordinator.rounds.evaluation_tasks import evaluation_setup
from core.taskspec import load_task_file
from fedctl.main import main as fedctl_main
from simulations.errors import SimulationConfigError
from simulations.evaluation import (
    EvaluationRound,
    EvaluationRunner,
    is_evaluation_file,
    load_evaluation_file,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "simulations" / "examples" / \
    "evaluate_digits.yaml"

#: Small and fast: logistic regression on digits, 12 devices, 6 a round.
TINY = """\
name: tiny-eval
kind: evaluate
seed: 0
model: {architecture: logistic_regression, arguments: {input_dim: 64, num_classes: 10}}
rounds: 2
clients_per_round: 6
min_reports: 3
local: {epochs: 2, batch_size: 10, learning_rate: 0.05}
evaluate:
  versions: [0, 6]
  max_examples: 64
  histograms: {loss: {bins: 8, low: 0, high: 4}}
  quantiles: [0.1, 0.5, 0.9]
  sketch: true
simulation:
  population: {devices: 12, data: "digits:dirichlet=1.0"}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EvaluationRunner,
                                                              list[EvaluationRound]]:
    path = tmp_path_factory.mktemp("eval") / "tiny.yaml"
    path.write_text(TINY)
    config, evaluation = load_evaluation_file(path)
    runner = EvaluationRunner(config, evaluation)
    return path, runner, list(runner.rounds())


def test_version_n_is_the_model_after_n_training_rounds_and_beats_the_initial_one(
        tiny: tuple[Path, EvaluationRunner, list[EvaluationRound]]) -> None:
    _, runner, history = tiny
    assert runner.config.rounds == 6  # trained for the largest version
    assert [h.round for h in history] == [1, 2] and all(h.committed for h in history)
    for h in history:
        m = h.metrics
        assert m["eval.v0.devices"] == m["eval.v6.devices"] == len(h.devices) == 6
        assert m["eval.v6.accuracy.mean"] > m["eval.v0.accuracy.mean"] + 0.2
        assert m["eval.v6.loss.mean"] < m["eval.v0.loss.mean"]
        assert m["eval.v6.loss.example_q50"] < m["eval.v0.loss.example_q50"]
    assert history[0].devices != history[1].devices  # a fresh cohort each round


def test_the_release_is_the_coordinators_for_the_same_plan(
        tiny: tuple[Path, EvaluationRunner, list[EvaluationRound]]) -> None:
    path, runner, history = tiny
    # The coordinator's task from the same file, its source named as a launch names it.
    spec = load_task_file(path, overrides={"evaluate.source_task": "t-1"})
    setup = evaluation_setup(spec)
    assert setup is not None
    assert setup.layout.plan == runner.layout.plan  # sketches included (clear reports)
    assert setup.quantiles == runner.evaluation.quantiles
    coordinator = PlainEvaluation(setup, rng=np.random.default_rng(0))
    for i, device in enumerate(history[0].devices):
        report = path.parent / f"report-{i}.f32"
        runner.report(device, 1).astype("<f4").tofile(report)
        coordinator.add_upload(report, 1, {})
    released = coordinator.release(None).metrics
    simulated = history[0].metrics
    assert sorted(released) == sorted(simulated)
    for name in ("eval.v0.loss.example_q50", "eval.v6.accuracy.se", "eval.v6.loss.q50",
                 "eval.v6.loss.bin3", "eval.v0.loss.device_se", "eval.v6.examples"):
        assert name in simulated
    for name, value in simulated.items():
        if "example_" not in name:  # sketch merges flip their own coins
            assert math.isclose(released[name], value, rel_tol=1e-9, abs_tol=1e-12), name


def test_cli_prints_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("versions: [0, 6]", "versions: [0, 2]"))
    assert fedctl_main(["simulate", str(path), "--json", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    assert (result["kind"], result["versions"], result["state"]) == ("evaluate", [0, 2],
                                                                    "completed")
    assert len(result["rounds"]) == 1 and result["rounds"][0]["devices"] == 6
    assert set(result["results"]) == {"0", "2"}
    assert "mean" in result["results"]["2"]["accuracy"]


def test_the_example_is_an_evaluation_file_that_launches_on_a_coordinator() -> None:
    assert is_evaluation_file(EXAMPLE)
    config, evaluation = load_evaluation_file(EXAMPLE)
    assert evaluation.plan.versions == (0, 20) and config.rounds == 20
    assert load_task_file(EXAMPLE).evaluate.versions == (0, 20)


@pytest.mark.parametrize(("change", "field"), [
    (("seed: 0", "seed: 0\nsecure_aggregation: {dropout: 0.01}"), "secure_aggregation"),
    (("seed: 0", "seed: 0\nprivacy: {mode: central, noise_multiplier: 0.5, delta: 1.0e-5, "
                 "clip: 1.0, population: 12}"), "privacy"),
    (("simulation:\n", "simulation:\n  experiment: {arms: []}\n"), "simulation.experiment"),
    (("  quantiles:", "  experiment: {arms: []}\n  quantiles:"), "evaluate.experiment"),
    (("versions: [0, 6]", "versions: []"), "evaluate.versions"),
    (("histograms: {loss:", "histograms: {f2:"), "evaluate.histograms.f2"),
    (("dirichlet=1.0\"}", "dirichlet=1.0\", load: per_round}"), "simulation.population.load"),
    (("clients_per_round: 6", "clients_per_round: 60"), "clients_per_round"),
])
def test_a_bad_or_unsimulated_file_is_refused_in_one_line_naming_file_and_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str],
        field: str) -> None:
    old, new = change
    assert old in TINY
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace(old, new))
    with pytest.raises(SimulationConfigError) as raised:
        load_evaluation_file(bad)
    assert raised.value.field == field
    assert fedctl_main(["simulate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"fedctl: error: {bad}: field '{field}': ")


def test_cli_prints_the_per_round_table(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("versions: [0, 6]", "versions: [0, 1]"))
    assert fedctl_main(["simulate", str(path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["round", "version", "metric", "devices"]
    assert len(lines) == 1 + 2 * 2 * 2 + 1  # rounds x versions x metrics, then the end
    assert lines[-1].startswith("tiny-eval: versions 0, 1 evaluated in 2 rounds, completed")


def test_a_round_without_min_reports_fails_the_evaluation_as_a_coordinator_would(
        tmp_path: Path) -> None:
    path = tmp_path / "offline.yaml"
    path.write_text(TINY.replace("versions: [0, 6]", "versions: [0]").replace(
        "simulation:\n", "simulation:\n  max_failed_attempts: 2\n  heterogeneity: "
                         "{availability: {kind: constant, value: 0.2}}\n").replace(
        "min_reports: 3", "min_reports: 6"))
    config, evaluation = load_evaluation_file(path)
    runner = EvaluationRunner(config, evaluation)
    history = list(runner.rounds())
    assert [(h.round, h.committed, h.attempts, h.metrics) for h in history] == [
        (1, False, 2, {})]
    assert runner.state.value == "failed"
    assert "2 attempts had fewer than min_reports (6)" in runner.stop_reason


@pytest.mark.parametrize("flag", [["--out", "x.json"], ["--ray", "local"]])
def test_a_flag_an_evaluation_file_has_no_use_for_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str]) -> None:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    assert fedctl_main(["simulate", str(path), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedctl: error: {flag[0]} does not apply to an evaluation file ({path}): "
                   "it runs in this process and prints its results")
