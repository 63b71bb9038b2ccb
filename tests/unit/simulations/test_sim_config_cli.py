"""Task files in simulation: errors name the file and the field as written in the task file;
`fedctl simulate` runs a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedctl.main import main as fedctl_main
from simulations.config import AlgorithmKind, parse_simulation_yaml
from simulations.data import dataset_arrays, dirichlet_partition, iid_partition
from simulations.devices import device_profiles
from simulations.errors import SimulationConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "simulations" / "examples"

TINY = """
name: tiny
rounds: 3
model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
clients_per_round: 3
min_reports: 1
local: {epochs: 1, batch_size: 10, learning_rate: 0.01}
simulation:
  population: {devices: 6, data: "synthetic:alpha=1,beta=1"}
"""


def _edited(edit: str) -> str:
    """TINY with a top-level key replaced, or a line added under ``simulation:``."""
    if edit.startswith("  "):
        return TINY + edit + "\n"
    key = edit.split(":")[0]
    text = TINY.split("simulation:")[0] + "\n" if key == "simulation" else TINY
    lines = [line for line in text.splitlines() if not line.startswith(f"{key}:")]
    return "\n".join(lines) + "\n" + edit + "\n"


def test_a_minimal_file_gets_the_defaults() -> None:
    config = parse_simulation_yaml(TINY)
    assert config.data.spec == "synthetic:alpha=1,beta=1" and config.data.num_devices == 6
    assert config.algorithm.kind is AlgorithmKind.FEDAVG
    # The task's over_selection default (1.3) applies: 3 x 1.3 rounds to 4 admitted.
    assert config.selection.admitted == 4
    # The task's round_deadline_s (60 s of wall clock) is not the simulated deadline.
    assert config.selection.round_deadline_s == 0


@pytest.mark.parametrize(("edit", "field", "message"), [
    ("local: {epochs: 0}", "local.epochs", "at least 1"),
    ("over_selection: 0.5", "over_selection", "between 1.0 and 10.0"),
    ("clients_per_round: 30", "clients_per_round", "at most simulation.population.devices"),
    ("min_reports: 4", "min_reports", "between"),
    ("  algorithm: {kind: fedsgd}", "simulation.algorithm.kind",
     "one of 'fedavg', 'fedprox', 'scaffold'"),
    ("  algorithm: {kind: fedavg, mu: 1}", "simulation.algorithm.mu", "only fedprox"),
    ("  heterogeneity: {dropout: 1.5}", "simulation.heterogeneity.dropout", "[0, 1]"),
    ("  heterogeneity: {trace: nope.csv}", "simulation.heterogeneity.trace", "no such file"),
    ("  round_deadline_s: -1", "simulation.round_deadline_s", "at least 0"),
    ("  engine: {processes: 0}", "simulation.engine.processes", "at least 1"),
    ("  surprise: 1", "simulation.surprise", "unknown field"),
    ("  test_data: \"nope:split=test\"", "simulation.test_data", "unknown source"),
    ("model: {architecture: mlp, arguments: {input_dim: 60, num_classes: 10}}",
     "model.arguments.hidden", "required"),
    ("server: {kind: fedadam, beta1: 2}", "server.beta1", "[0, 1)"),
    ("surprise: 1", "surprise", "unknown field"),
    ("rounds: three", "rounds", "expected an integer"),
    ("evaluation: {server_data: \"nope:x=1\"}", "evaluation.server_data", "unknown source"),
    ("simulation: {population: {devices: 0, data: \"synthetic:alpha=1,beta=1\"}}",
     "simulation.population.devices", "at least 1"),
    ("simulation: {population: {devices: 6, data: \"digits:shard=0/6\"}}",
     "simulation.population.data", "leave shard out"),
    ("simulation: {population: {devices: 6}}", "simulation.population.data", "required"),
    ("simulation: [1]", "simulation", "expected a mapping"),
])
def test_bad_fields_are_named_as_written_in_the_task_file(edit: str, field: str,
                                                           message: str) -> None:
    with pytest.raises(SimulationConfigError) as caught:
        parse_simulation_yaml(_edited(edit), source="task.yaml")
    assert caught.value.field == field
    assert str(caught.value).startswith(f"task.yaml: field '{field}': ")
    assert message in str(caught.value)


def test_a_source_refusing_its_fields_is_named_when_the_data_loads() -> None:
    from simulations.engine import Simulation

    config = parse_simulation_yaml(_edited(
        "simulation: {population: {devices: 6, data: \"synthetic:alpha=1\"}}"), source="t.yaml")
    with pytest.raises(SimulationConfigError) as caught:
        Simulation(config)
    assert caught.value.field == "simulation.population.data"
    assert str(caught.value).startswith("t.yaml: field 'simulation.population.data': ")
    assert "beta is required" in str(caught.value)


def test_a_file_without_a_population_says_how_to_give_one() -> None:
    text = TINY.split("simulation:")[0]
    with pytest.raises(SimulationConfigError) as caught:
        parse_simulation_yaml(text, source="task.yaml")
    assert caught.value.field == "simulation.population"
    assert "--population SPEC --devices N" in str(caught.value)


def test_the_old_simulation_format_is_refused_saying_where_its_keys_went() -> None:
    old = """
name: old
rounds: 3
model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
data: {source: synthetic, num_devices: 6}
selection: {clients_per_round: 3}
"""
    with pytest.raises(SimulationConfigError) as caught:
        parse_simulation_yaml(old, source="sim.yaml")
    assert caught.value.field == "data"
    assert "simulation.population" in str(caught.value)


def test_not_yaml_and_missing_fields_are_reported() -> None:
    with pytest.raises(SimulationConfigError, match=r"sim.yaml: top level: not valid YAML"):
        parse_simulation_yaml("a: [", source="sim.yaml")
    with pytest.raises(SimulationConfigError, match=r"field 'clients_per_round': is required"):
        parse_simulation_yaml(_edited("clients_per_round: 3").replace("clients_per_round: 3",
                                                                      ""), source="sim.yaml")


def test_a_trace_overrides_the_drawn_profiles(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text("device,speed,dropout\n2,7.5,0.25\n")
    config = parse_simulation_yaml(TINY + "  heterogeneity: {trace: trace.csv}\n",
                                   base_dir=str(tmp_path))
    profiles = device_profiles(config.heterogeneity, 6, seed=0, base_dir=str(tmp_path))
    assert profiles.speed[2] == 7.5 and profiles.dropout[2] == 0.25
    assert profiles.speed[0] == 1000.0 and profiles.dropout[0] == 0.0
    (tmp_path / "trace.csv").write_text("device,speed\n9,1\n")
    with pytest.raises(SimulationConfigError, match="out of range"):
        device_profiles(config.heterogeneity, 6, seed=0, base_dir=str(tmp_path))


def test_partitioners_cover_every_example_once() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=300)
    for parts in (iid_partition(300, 7, rng), dirichlet_partition(labels, 7, 0.1, rng)):
        assert len(parts) == 7 and all(len(p) >= 1 for p in parts)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(300))


def test_any_torch_dataset_becomes_arrays() -> None:
    import torch
    from torch.utils.data import TensorDataset

    dataset = TensorDataset(torch.randn(5, 2, 3), torch.tensor([0, 1, 2, 1, 0]))
    x, y = dataset_arrays(dataset)
    assert x.shape == (5, 6) and x.dtype == np.float32 and y.tolist() == [0, 1, 2, 1, 0]


def _fedctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedctl", "simulate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_runs_an_example_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _fedctl(str(EXAMPLES / "digits_fedavg.yaml"), "--rounds", "2", "--out", str(out),
                   "--json", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, "--json: one JSON line on stdout, the progress bar on stderr"
    summary = json.loads(lines[0])
    assert summary["rounds"] == 2 and 0 <= summary["final_accuracy"] <= 1
    assert {p.name for p in out.iterdir()} == {"metrics.jsonl", "metrics.csv", "metrics.png"}


@pytest.mark.slow  # spawns worker processes
def test_cli_splits_the_cohort_across_worker_processes(tmp_path: Path) -> None:
    sim = tmp_path / "procs.yaml"
    sim.write_text(TINY + "  engine: {processes: 2}\n")
    out = tmp_path / "run"
    done = _fedctl(str(sim), "--out", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tiny: 3/3 rounds committed, test accuracy ")


def test_cli_reports_a_bad_file_in_one_line_with_exit_code_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("epochs: 1", "epochs: -3"))
    assert fedctl_main(["simulate", str(bad)]) == 2  # in this process: refused before it runs
    assert capsys.readouterr().err.strip() == (f"fedctl: error: {bad}: field 'local.epochs': "
                                               f"must be at least 1, got -3")


def test_cli_reports_a_bad_app_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    # In this process: an exception main() did not turn into its one-line error would raise.
    assert fedctl_main(["simulate", str(EXAMPLES / "digits_fedavg.yaml"),
                        "--app", "no_such_module_xyz:app"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err
