"""Federated tuning (simulations.tuning, fedctl tune): an Optuna study over a task file's
fields, each trial a simulation, weak trials pruned by their evaluation curve."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulations.config import load_simulation_file
from simulations.errors import SimulationConfigError
from simulations.tuning import (
    Direction,
    SimulationTrials,
    StudyAborted,
    StudyResult,
    StudySpec,
    TrialState,
    load_study_file,
    run_study,
    study_from_dict,
    write_results,
)

pytest.importorskip("optuna")

#: A task that learns in a few rounds (logistic regression on IID synthetic data) at a
#: good learning rate and stays near chance at a tiny one: pruning has something to find.
TASK: dict[str, Any] = {
    "name": "tiny-task", "seed": 0,
    "model": {"architecture": "logistic_regression",
              "arguments": {"input_dim": 60, "num_classes": 10}},
    "rounds": 5, "clients_per_round": 4, "min_reports": 2,
    "local": {"epochs": 2, "batch_size": 10, "optimizer": "sgd", "learning_rate": 0.05},
    "server": {"kind": "fedavg", "learning_rate": 1.0},
    "simulation": {"population": {"devices": 8, "data": "synthetic:alpha=0,beta=0,iid=true"}},
}

STUDY: dict[str, Any] = {
    "name": "tiny-study", "task": TASK, "trials": 6, "parallel": 1, "seed": 3,
    "objective": {"metric": "accuracy", "direction": "maximize"},
    "sampler": {"kind": "tpe", "startup_trials": 2},
    "pruner": {"kind": "median", "startup_trials": 1, "warmup_rounds": 0},
    "space": {
        "local.learning_rate": {"type": "float", "low": 0.0001, "high": 1.0, "log": True},
        "local.batch_size": {"type": "categorical", "choices": [5, 20]},
    },
}


def write_study(tmp_path: Path, study: dict[str, Any], name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def run(spec: StudySpec, *, processes: bool = False) -> StudyResult:
    with SimulationTrials(parallel=spec.parallel if processes else 1,
                          source=spec.source) as backend:
        return run_study(spec, backend)


@pytest.fixture(scope="module")
def tiny_result() -> StudyResult:
    return run(study_from_dict(STUDY, source="study.yaml"))


def summary_of(result: StudyResult) -> list[tuple[Any, ...]]:
    return [(t.number, dict(t.params), t.outcome.state, t.outcome.value, t.outcome.curve)
            for t in result.trials]


# --- the study ------------------------------------------------------------------------------


def test_every_trial_ends_and_the_best_is_the_best_completed_value(
        tiny_result: StudyResult) -> None:
    assert len(tiny_result.trials) == 6
    completed = [t for t in tiny_result.trials if t.outcome.state is TrialState.COMPLETE]
    assert completed and tiny_result.best is not None
    assert tiny_result.best.outcome.value == max(t.outcome.value or 0.0 for t in completed)
    # The study's best learned: well above chance (0.1) on 10 classes.
    assert tiny_result.best.outcome.value > 0.5
    for t in completed:
        assert t.outcome.rounds == 5
        assert [r for r, _ in t.outcome.curve] == [1, 2, 3, 4, 5]
        assert t.outcome.value == t.outcome.curve[-1][1]


def test_weak_trials_are_pruned_by_the_median_of_completed_trials_at_the_same_round(
        tiny_result: StudyResult) -> None:
    pruned = [t for t in tiny_result.trials if t.outcome.state is TrialState.PRUNED]
    assert pruned, "the tiny learning rates should have been pruned"
    for t in pruned:
        last_round, last_value = t.outcome.curve[-1]
        assert t.outcome.rounds == last_round
        earlier = [c for c in tiny_result.trials[:t.number]
                   if c.outcome.state is TrialState.COMPLETE]
        at_round = [dict(c.outcome.curve)[last_round] for c in earlier]
        # Optuna's median pruner (maximize): the trial's best so far is below the median of
        # the completed trials' values at that round.
        best_so_far = max(v for _, v in t.outcome.curve)
        assert best_so_far < statistics.median(at_round)
    for t in tiny_result.trials:
        if t.outcome.state is TrialState.COMPLETE:
            earlier = [c for c in tiny_result.trials[:t.number]
                       if c.outcome.state is TrialState.COMPLETE]
            for r, _ in t.outcome.curve if earlier else ():
                best = max(v for rr, v in t.outcome.curve if rr <= r)
                assert best >= statistics.median(dict(c.outcome.curve)[r] for c in earlier)


def test_a_seeded_study_is_reproducible(tiny_result: StudyResult) -> None:
    again = run(study_from_dict(STUDY, source="study.yaml"))
    assert summary_of(again) == summary_of(tiny_result)


@pytest.mark.slow
def test_parallel_trials_in_processes_give_the_same_study_as_in_process(tmp_path: Path) -> None:
    spec = study_from_dict({**STUDY, "trials": 4, "parallel": 2}, source="study.yaml")
    in_process = run(spec)
    in_workers = run(spec, processes=True)
    assert summary_of(in_workers) == summary_of(in_process)
    assert {t.outcome.state for t in in_workers.trials} <= {TrialState.COMPLETE,
                                                            TrialState.PRUNED}


def test_a_baseline_study_runs_the_task_as_written_first() -> None:
    space = {**STUDY["space"], "local.batch_size": {"type": "categorical",
                                                    "choices": [5, 10, 20]}}
    spec = study_from_dict({**STUDY, "baseline": True, "trials": 1, "space": space},
                           source="study.yaml")
    (trial,) = run(spec).trials
    assert dict(trial.params) == {"local.learning_rate": 0.05, "local.batch_size": 10}


def test_loss_is_minimized_by_default() -> None:
    spec = study_from_dict({**STUDY, "objective": {"metric": "loss"}}, source="s.yaml")
    assert spec.objective.direction is Direction.MINIMIZE


def test_a_fault_of_the_base_task_stops_the_study_naming_its_field() -> None:
    task = {**TASK, "simulation": {"population": {"devices": 8,
                                                  "data": "synthetic:alpha=0,beta=0,iid=1"}}}
    spec = study_from_dict({**STUDY, "task": task}, source="study.yaml")
    with pytest.raises(StudyAborted, match=r"study.yaml: field 'simulation.population.data'"):
        run(spec)


# --- outputs --------------------------------------------------------------------------------


def test_results_are_a_csv_of_all_trials_a_runnable_best_task_a_summary_and_a_plot(
        tiny_result: StudyResult, tmp_path: Path) -> None:
    write_results(tiny_result, tmp_path)
    with (tmp_path / "trials.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == list(range(6))
    assert set(rows[0]) >= {"number", "state", "value", "rounds", "params.local.learning_rate",
                            "params.local.batch_size", "reason"}
    assert {r["state"] for r in rows} == {"complete", "pruned"}
    for row, trial in zip(rows, tiny_result.trials, strict=True):
        assert float(row["value"]) == pytest.approx(trial.outcome.value)
        assert int(row["rounds"]) == trial.outcome.rounds
    best = tiny_result.best
    assert best is not None
    config = load_simulation_file(tmp_path / "best.yaml")
    assert config.local.learning_rate == best.params["local.learning_rate"]
    assert config.local.batch_size == best.params["local.batch_size"]
    summary = json.loads((tmp_path / "study.json").read_text(encoding="utf-8"))
    assert summary["best"]["number"] == best.number
    assert summary["complete"] + summary["pruned"] + summary["failed"] == 6
    png = (tmp_path / "trials.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_without_a_completed_trial_there_is_no_best_file(tiny_result: StudyResult,
                                                         tmp_path: Path) -> None:
    (tmp_path / "best.yaml").write_text("stale", encoding="utf-8")
    failed = dataclasses.replace(tiny_result, best=None, trials=tuple(
        dataclasses.replace(t, outcome=dataclasses.replace(t.outcome, state=TrialState.FAILED))
        for t in tiny_result.trials))
    write_results(failed, tmp_path)
    assert not (tmp_path / "best.yaml").exists()
    assert (tmp_path / "trials.csv").exists()


# --- bad study files ------------------------------------------------------------------------


def _space(**entries: Any) -> dict[str, Any]:
    return {**STUDY, "space": entries}


@pytest.mark.parametrize(("study", "field", "message"), [
    ({**STUDY, "trials": 0}, "trials", "between 1 and"),
    ({**STUDY, "parallel": -1}, "parallel", "between 1 and"),
    ({**STUDY, "trails": 3}, "trails", "unknown field"),
    ({k: v for k, v in STUDY.items() if k != "space"}, "space", "is required"),
    ({**STUDY, "objective": {"metric": "accuracy", "direction": "up"}},
     "objective.direction", "maximize"),
    ({**STUDY, "pruner": {"kind": "hyperband"}}, "pruner.kind", "median"),
    ({**STUDY, "task": "no-such-task.yaml"}, "task", "cannot read the task file"),
    (_space(**{"local.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}),
     "space.local.learning_rate.low", "positive with log"),
    (_space(**{"local.learning_rate": {"type": "float", "low": 0.5, "high": 0.1}}),
     "space.local.learning_rate.high", "at least low"),
    (_space(**{"local.learning_rate": {"type": "normal", "low": 0.1, "high": 1}}),
     "space.local.learning_rate.type", "categorical"),
    (_space(**{"local.epochs": {"type": "int", "low": 1.5, "high": 3}}),
     "space.local.epochs.low", "integer"),
    (_space(**{"local.batch_size": {"type": "categorical", "choices": []}}),
     "space.local.batch_size.choices", "non-empty"),
    (_space(**{"local.batch_size": {"type": "categorical", "choices": [8, 8]}}),
     "space.local.batch_size.choices", "repeat"),
    (_space(**{"local.learnin_rate": {"type": "float", "low": 0.1, "high": 1}}),
     "space.local.learnin_rate", "unknown field"),
    (_space(**{"local.epochs": {"type": "int", "low": 0, "high": 3}}),
     "space.local.epochs", "0 makes the task invalid"),
    # FedProx's mu on a FedAvg task: the range's high end is refused by the task's check.
    (_space(**{"simulation.algorithm.mu": {"type": "float", "low": 0, "high": 1}}),
     "space.simulation.algorithm.mu", "only fedprox uses mu"),
    ({**STUDY, "task": {**TASK, "local": {**TASK["local"], "epochs": 0}}},
     "local.epochs", "at least 1"),
    ({**STUDY, "baseline": True}, "space.local.batch_size.choices", "among the choices"),
    ({**_space(**{"local.learning_rate": {"type": "float", "low": 0.1, "high": 1}}),
      "baseline": True}, "space.local.learning_rate", "inside [0.1, 1]"),
])
def test_a_bad_study_file_is_refused_naming_the_file_and_the_field(
        tmp_path: Path, study: dict[str, Any], field: str, message: str) -> None:
    path = write_study(tmp_path, study)
    with pytest.raises(SimulationConfigError) as info:
        load_study_file(path)
    assert info.value.field == field
    assert str(info.value).startswith(f"{path}: field '{field}'")
    assert message in info.value.message


def test_a_task_file_is_read_relative_to_the_study(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    task_path = tmp_path / "tasks" / "task.yaml"
    task_path.write_text(yaml.safe_dump({**TASK, "local": {**TASK["local"], "epochs": 0}}),
                         encoding="utf-8")
    path = write_study(tmp_path, {**STUDY, "task": "tasks/task.yaml"})
    with pytest.raises(SimulationConfigError, match=rf"^{task_path}: field 'local.epochs'"):
        load_study_file(path)


# --- fedctl tune ----------------------------------------------------------------------------


def fedctl_tune(*argv: str) -> argparse.Namespace:
    from fedctl.tune import register

    parser = argparse.ArgumentParser(prog="fedctl")
    register(parser.add_subparsers())
    return parser.parse_args(["tune", *argv])


def test_fedctl_tune_prints_one_json_line_and_writes_the_results(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path, {**STUDY, "trials": 3})
    args = fedctl_tune(str(path), "--out", str(tmp_path / "out"), "--json")
    assert args.func(args) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["name"] == "tiny-study" and summary["trials"] == 3
    assert summary["best"]["params"].keys() == {"local.learning_rate", "local.batch_size"}
    assert summary["out"] == str(tmp_path / "out")
    assert "[3/3] trial 2:" in out.err
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "trials.csv", "best.yaml", "study.json", "trials.png"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--trials", "0"], "--trials must be at least 1"),
    (["--token", "t"], "--token needs --coordinator"),
    (["--coordinator", "localhost:1"], "field 'space.simulation.algorithm.mu': is a "
                                       "simulation setting"),
])
def test_fedctl_tune_refuses_bad_flags_with_exit_code_2(tmp_path: Path, argv: list[str],
                                                        message: str) -> None:
    from fedctl.errors import CliError

    task = {**TASK, "evaluation": {"server_data": "synthetic:alpha=0,beta=0,iid=true"},
            "simulation": {**TASK["simulation"], "algorithm": {"kind": "fedprox"}}}
    path = write_study(tmp_path, {**STUDY, "task": task, "space": {
        **STUDY["space"],
        "simulation.algorithm.mu": {"type": "float", "low": 0.0, "high": 0.5}}})
    args = fedctl_tune(str(path), *argv)
    with pytest.raises(CliError, match=message) as info:
        args.func(args)
    assert info.value.exit_code == 2


def test_fedctl_tune_on_a_coordinator_needs_an_evaluation_curve(tmp_path: Path) -> None:
    from fedctl.errors import CliError

    path = write_study(tmp_path, {**STUDY, "task": {**TASK, "evaluation": {"fraction": 0}}})
    args = fedctl_tune(str(path), "--coordinator", "localhost:1")
    with pytest.raises(CliError, match=r"field 'evaluation': a trial on a coordinator needs "
                                       r"an evaluation curve for accuracy") as info:
        args.func(args)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("evaluation", "curve"), [
    ({"fraction": 0.5}, "eval_accuracy"),
    ({"fraction": 0.5, "server_data": "digits:split=test"}, "eval_accuracy"),
    ({"fraction": 0, "server_data": "digits:split=test"}, "server_eval_accuracy"),
    ({"server_data": "digits:split=test"}, "server_eval_accuracy"),
])
def test_on_a_coordinator_the_curve_is_the_federated_evaluation_where_the_task_has_one(
        evaluation: dict[str, object], curve: str) -> None:
    from fedctl.tune import curve_metric

    assert curve_metric({**TASK, "evaluation": evaluation}, "accuracy") == curve


def test_the_example_study_loads() -> None:
    root = Path(__file__).resolve().parents[3]
    spec = load_study_file(root / "simulations" / "examples" / "studies" / "tune_digits.yaml")
    assert {p.path for p in spec.space} == {
        "local.learning_rate", "local.epochs", "local.batch_size", "server.learning_rate",
        "simulation.algorithm.mu"}


def test_a_study_refuses_a_task_that_trains_in_several_processes(tmp_path: Path) -> None:
    task = {**TASK, "simulation": {**TASK["simulation"], "engine": {"processes": 2}}}
    path = write_study(tmp_path, {**STUDY, "task": task})
    with pytest.raises(SimulationConfigError, match="field 'simulation.engine.processes': "
                                                    "must be 1 in a study"):
        load_study_file(path)
