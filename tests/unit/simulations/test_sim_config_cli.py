"""Simulation files: errors name the file and the field; `fedctl simulate` runs a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.config import (
    AlgorithmKind,
    DataSource,
    load_simulation_file,
    parse_simulation_yaml,
)
from simulations.data import dataset_arrays, dirichlet_partition, iid_partition
from simulations.devices import device_profiles
from simulations.errors import SimulationConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "simulations" / "examples"

TINY = """
name: tiny
rounds: 3
model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
data: {source: synthetic, num_devices: 6}
selection: {clients_per_round: 3}
local: {epochs: 1, batch_size: 10, learning_rate: 0.01}
"""


def test_examples_parse() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert load_simulation_file(path).rounds >= 1


def test_a_minimal_file_gets_the_defaults() -> None:
    config = parse_simulation_yaml(TINY)
    assert config.data.source is DataSource.SYNTHETIC
    assert config.algorithm.kind is AlgorithmKind.FEDAVG
    assert config.selection.admitted == 3


@pytest.mark.parametrize(("edit", "field", "message"), [
    ("local: {epochs: 0}", "local.epochs", "at least 1"),
    ("algorithm: {kind: fedsgd}", "algorithm.kind", "one of 'fedavg', 'fedprox', 'scaffold'"),
    ("algorithm: {kind: fedavg, mu: 1}", "algorithm.mu", "only fedprox"),
    ("selection: {clients_per_round: 30}", "selection.clients_per_round", "at most"),
    ("selection: {clients_per_round: 3, min_reports: 4}", "selection.min_reports", "between"),
    ("heterogeneity: {dropout: 1.5}", "heterogeneity.dropout", "[0, 1]"),
    ("heterogeneity: {trace: nope.csv}", "heterogeneity.trace", "no such file"),
    ("model: {architecture: mlp, arguments: {input_dim: 60, num_classes: 10}}",
     "model.arguments.hidden", "required"),
    ("server: {kind: fedadam, beta1: 2}", "server.beta1", "[0, 1)"),
    ("surprise: 1", "surprise", "unknown field"),
    ("rounds: three", "rounds", "expected an integer"),
    ("engine: {processes: 0}", "engine.processes", "at least 1"),
])
def test_bad_fields_are_named(edit: str, field: str, message: str) -> None:
    key = edit.split(":")[0]
    text = "\n".join(line for line in TINY.splitlines() if not line.startswith(f"{key}:"))
    with pytest.raises(SimulationConfigError) as caught:
        parse_simulation_yaml(text + "\n" + edit + "\n", source="sim.yaml")
    assert caught.value.field == field
    assert str(caught.value).startswith(f"sim.yaml: field '{field}': ")
    assert message in str(caught.value)


def test_not_yaml_and_missing_fields_are_reported() -> None:
    with pytest.raises(SimulationConfigError, match=r"sim.yaml: top level: not valid YAML"):
        parse_simulation_yaml("a: [", source="sim.yaml")
    with pytest.raises(SimulationConfigError, match=r"field 'selection': is required"):
        parse_simulation_yaml("\n".join(TINY.splitlines()[:5]), source="sim.yaml")


def test_a_trace_overrides_the_drawn_profiles(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text("device,speed,dropout\n2,7.5,0.25\n")
    config = parse_simulation_yaml(TINY + "heterogeneity: {trace: trace.csv}\n",
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
                   cwd=ROOT)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and 0 <= summary["final_accuracy"] <= 1
    assert {p.name for p in out.iterdir()} == {"metrics.jsonl", "metrics.csv", "metrics.png"}


def test_cli_splits_the_cohort_across_worker_processes(tmp_path: Path) -> None:
    sim = tmp_path / "procs.yaml"
    sim.write_text(TINY + "engine: {processes: 2}\n")
    out = tmp_path / "run"
    done = _fedctl(str(sim), "--out", str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["rounds"] == 3


def test_cli_reports_a_bad_file_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("epochs: 1", "epochs: -3"))
    done = _fedctl(str(bad), cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"fedctl: error: {bad}: field 'local.epochs': "
                                   f"must be at least 1, got -3")
