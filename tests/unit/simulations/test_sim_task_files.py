"""One schema: a task file runs on a coordinator and in simulation. The examples are task
files; the population can come from the command line; devices load their data through the
data-spec registry (so an app's data source works), and the built-in sources give a
simulated device what an agent with the same spec holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.data.dataset import LocalDataset
from core.data.params import DataParams
from core.taskspec import load_task_file
from core.types import TaskKind
from fedctl.main import main as fedctl_main
from simulations.config import DataConfig, EngineKind, load_simulation_file, parse_simulation_yaml
from simulations.data import load_federated_data
from simulations.engine import Simulation
from simulations.errors import SimulationConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted([*(ROOT / "examples").glob("*.yaml"),
                   *(ROOT / "simulations" / "examples").glob("*.yaml")])
#: Privacy modes the simulator does not run yet (it runs central DP).
NOT_SIMULATED = {"digits_mlp_local_dp.yaml": "local", "digits_mlp_distributed_dp.yaml":
                 "distributed"}

TASK = """
name: tiny
rounds: 2
model: {architecture: logistic_regression, arguments: {input_dim: 60, num_classes: 10}}
clients_per_round: 3
min_reports: 1
local: {epochs: 1, batch_size: 10, learning_rate: 0.01}
"""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_is_a_task_file_and_a_simulation(path: Path) -> None:
    spec = load_task_file(path)
    if spec.kind is TaskKind.EVALUATE:  # evaluation tasks run on a coordinator only, so far
        with pytest.raises(SimulationConfigError, match="'evaluate' is not simulated"):
            load_simulation_file(path)
        return
    assert spec.simulation, "each example says how to simulate it"
    if path.name in NOT_SIMULATED:
        with pytest.raises(SimulationConfigError, match=f"'{NOT_SIMULATED[path.name]}' is not "
                                                        "simulated"):
            load_simulation_file(path)
        return
    config = load_simulation_file(path)
    assert (config.name, config.rounds, config.model) == (spec.name, spec.rounds, spec.model)
    assert config.selection.clients_per_round == spec.clients_per_round
    assert config.local == spec.local and config.server == spec.server


def test_the_command_line_gives_or_replaces_the_population() -> None:
    with pytest.raises(SimulationConfigError) as caught:
        parse_simulation_yaml(TASK, source="task.yaml")
    assert caught.value.field == "simulation.population"
    config = parse_simulation_yaml(TASK, population="synthetic:alpha=0.5,beta=0.5", devices=7)
    assert config.data == DataConfig("synthetic:alpha=0.5,beta=0.5", 7)
    written = TASK + "simulation: {population: {devices: 5, data: \"synthetic:alpha=1,beta=1\"}}\n"
    assert parse_simulation_yaml(written, devices=9).data.num_devices == 9
    assert parse_simulation_yaml(written, population="digits").data.spec == "digits"
    with pytest.raises(SimulationConfigError) as caught:
        parse_simulation_yaml(TASK, population="digits", source="task.yaml")
    assert caught.value.field == "simulation.population.devices"
    assert "--devices N" in str(caught.value)


def test_builtin_sources_give_each_device_what_an_agent_with_that_spec_holds() -> None:
    from core.data.digits import digits_shard, digits_test_set
    from core.data.synthetic import synthetic_shard

    synthetic = load_federated_data(DataConfig("synthetic:alpha=1,beta=1,seed=3", 5))
    for k in range(5):
        expected = synthetic_shard(alpha=1, beta=1, shard=k, num_shards=5, seed=3)
        np.testing.assert_array_equal(synthetic.x_train[k], expected.x_train)
        np.testing.assert_array_equal(synthetic.y_train[k], expected.y_train)
    expected_test = [synthetic_shard(alpha=1, beta=1, shard=k, num_shards=5, seed=3).y_test
                     for k in range(5)]
    np.testing.assert_array_equal(synthetic.y_test, np.concatenate(expected_test))

    digits = load_federated_data(DataConfig("digits:dirichlet=0.3", 8, "digits:split=test"))
    for k in range(8):
        agent = digits_shard(shard=k, num_shards=8, dirichlet=0.3)
        np.testing.assert_array_equal(digits.x_train[k], agent.x_train)
        np.testing.assert_array_equal(digits.y_train[k], agent.y_train)
    np.testing.assert_array_equal(digits.y_test, digits_test_set().y_test)


# -- an app's data source and model --------------------------------------------------------

def _blobs(params: DataParams) -> LocalDataset:
    """A user source: 2x3 'images' whose label is the sign pattern of two features."""
    shard, shards = params.shard()
    size = params.integer("size", default=40)
    rng = np.random.default_rng([shard, shards])
    x = rng.normal(size=(size + 10, 2, 3)).astype(np.float32)
    y = ((x[:, 0, 0] > 0).astype(np.int64) * 2 + (x[:, 1, 2] > 0)).astype(np.int64)
    return LocalDataset(x_train=x[:size], y_train=y[:size], x_test=x[size:], y_test=y[size:],
                        classes=4)


def _flat_net(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, num_classes))


def _smoothed(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


def _share_right(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"share_right": float((model(x).argmax(1) == y).float().mean())}


@pytest.fixture(scope="module")
def app() -> None:
    from core.apps import App, install
    from core.errors import AppError

    try:
        install(App(models={"simtest_flat_net": _flat_net}, data={"simtest_blobs": _blobs}),
                origin="tests")
        install(App(models={"simtest_smoothed_net": _flat_net}, loss=_smoothed,
                    metrics=_share_right), origin="tests")
    except AppError:  # registered by an earlier module in this process
        pass


APP_TASK = """
name: app
rounds: 15
model: {architecture: ARCH, arguments: {num_classes: 4}}
data_schema: {feature_shape: [2, 3], num_classes: 4}
clients_per_round: 4
over_selection: 1.0
min_reports: 4
local: {epochs: 2, batch_size: 8, learning_rate: 0.2}
simulation:
  population: {devices: 6, data: "simtest_blobs:size=40"}
"""


@pytest.mark.usefixtures("app")
def test_an_apps_data_source_and_model_train_in_simulation() -> None:
    config = parse_simulation_yaml(APP_TASK.replace("ARCH", "simtest_flat_net"))
    sim = Simulation(config)
    assert sim.data.feature_shape == (2, 3) and sim.data.num_devices == 6
    history = list(sim.rounds())
    assert all(m.committed for m in history)
    assert history[-1].test_accuracy is not None and history[-1].test_accuracy > 0.6


@pytest.mark.usefixtures("app")
def test_an_apps_loss_trains_in_the_loop_and_its_metrics_are_reported() -> None:
    config = parse_simulation_yaml(APP_TASK.replace("ARCH", "simtest_smoothed_net"))
    sim = Simulation(config)
    assert type(sim.trainer).__name__ == "LoopTrainer"
    history = list(sim.rounds())
    assert history[-1].metrics["share_right"] == pytest.approx(history[-1].test_accuracy)
    assert history[-1].metrics["share_right"] > 0.6


@pytest.mark.usefixtures("app")
def test_a_vectorized_engine_refuses_an_apps_loss_naming_the_loop() -> None:
    from simulations.cohort import DeviceTable, LocalObjective, make_trainer

    config = parse_simulation_yaml(APP_TASK.replace("ARCH", "simtest_smoothed_net"))
    table = DeviceTable(load_federated_data(config.data))
    with pytest.raises(ValueError, match="engine 'loop'"):
        make_trainer(EngineKind.VMAP, config.model, table, config.local, LocalObjective())


@pytest.mark.usefixtures("app")
def test_a_data_schema_that_does_not_fit_the_devices_data_is_named() -> None:
    text = APP_TASK.replace("ARCH", "simtest_flat_net").replace("[2, 3]", "[6]")
    config = parse_simulation_yaml(text, source="app.yaml")
    with pytest.raises(SimulationConfigError) as caught:
        Simulation(config)
    assert caught.value.field == "data_schema.feature_shape"


def test_cli_simulates_a_task_file_without_a_simulation_section(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(TASK)

    def simulate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedctl", "simulate", str(task),
                               "--out", str(tmp_path / "run"), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    # Refused before anything runs: in this process (a fedctl process costs seconds).
    assert fedctl_main(["simulate", str(task), "--out", str(tmp_path / "run")]) == 2
    assert "field 'simulation.population'" in capsys.readouterr().err
    done = simulate("--population", "synthetic:alpha=1,beta=1", "--devices", "6", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["committed"] == 2
