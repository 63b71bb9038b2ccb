"""An engineer's own app (examples/custom_app: a model, a CSV data source, a loss and a
metric) trained from ONE task file: in simulation, then over gRPC with agent processes, and
the pulled model loaded with one public call."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import ENV, FEDCTL_CMD, CoordinatorProcess, start_agent, stop_all, wait_for_task

import fedcoord

pytestmark = pytest.mark.integration

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "custom_app"
TASK_FILE = APP_DIR / "task.yaml"
#: The app need not be installed: --app with its directory on PYTHONPATH finds it too.
APP_ENV = {**ENV, "PYTHONPATH": str(APP_DIR)}


def fedctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL_CMD, *args], capture_output=True, text=True, env=APP_ENV,
                          cwd=cwd, timeout=300)


def wait_for_check_ins(logs: list[Path], devices: int, timeout_s: float = 60) -> None:
    """Until every device has checked in once, reporting its data's schema."""
    deadline = time.monotonic() + timeout_s
    while sum(log.read_text(errors="replace").count("checked in with data")
              for log in logs if log.exists()) < devices:
        assert time.monotonic() < deadline, "the devices did not check in"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's data (its ``make_data``, called here rather than in a process of its
    own: that costs seconds of imports), written once for the module where the task file's
    relative ``path=rows.csv`` (and the server evaluation's ``holdout.csv``) find it: the
    folder the tests run fedctl and the coordinator in."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.syspath_prepend(str(APP_DIR))
        from custom_app.make_data import write

        return write(tmp_path_factory.mktemp("data") / "rows.csv")


def test_the_task_file_trains_the_custom_app_in_simulation(rows: Path, tmp_path: Path) -> None:
    result = fedctl("simulate", str(TASK_FILE), "--app", "custom_app:app", "--json",
                    "--out", str(tmp_path / "run"), cwd=rows.parent)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["committed"] == 8
    assert summary["final_accuracy"] > 0.6, "four classes: chance is 0.25"
    assert summary["final_metrics"]["macro_f1"] > 0.6, "the app's metric joins evaluation"


def test_the_same_task_file_trains_it_on_agent_processes_and_the_pulled_model_loads(
        rows: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Run where holdout.csv is: the task's server evaluation reads it with the app's source.
    coordinator = CoordinatorProcess(tmp_path, cwd=rows.parent)
    coordinator.start(["--app", "custom_app:app"])
    agents = []
    try:
        # One agent process hosts the 8 devices (a process costs seconds of start-up: torch).
        agents = [start_agent(coordinator.target, "tabular", f"csv_rows:path={rows},shard=0/8",
                              devices=8, extra=["--app", "custom_app:app"], verbose=True,
                              log=tmp_path / "agent.log", env={"PYTHONPATH": str(APP_DIR)})]
        wait_for_check_ins([tmp_path / "agent.log"], devices=8)
        # The same task for 13 features: the 8 devices reported 12, so it is refused.
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(TASK_FILE.read_text().replace("feature_shape: [12]", "feature_shape: "
                                                       "[13]").replace("input_dim: 12",
                                                                       "input_dim: 13"))
        refused = fedctl("task", "launch", str(wrong), "--coordinator", coordinator.target,
                         cwd=rows.parent)
        assert refused.returncode != 0
        assert ("declares data [13] -> 4 classes, but population 'default' reported [12] -> 4 "
                "classes (8 devices)") in refused.stderr, refused.stderr
        launched = fedctl("task", "launch", str(TASK_FILE), "--coordinator",
                          coordinator.target, cwd=rows.parent)
        assert launched.returncode == 0, launched.stderr + coordinator.log_text()
        task_id = launched.stdout.strip().splitlines()[-1].split()[-1]
        with coordinator.admin() as client:
            task = wait_for_task(client, task_id, timeout_s=240)
            rounds = client.list_rounds(task_id)
        assert task.state == "completed", coordinator.log_text()
        committed = [r for r in rounds if r.state == "committed"]
        assert len(committed) == 8
        assert any("eval_macro_f1" in r.metrics for r in committed), \
            "devices evaluate with the app's metric"
        assert committed[-1].metrics["server_eval_accuracy"] > 0.6, "unseen users, 4 classes"
        assert "server_eval_macro_f1" in committed[-1].metrics

        out = tmp_path / "model.safetensors"
        pulled = fedctl("model", "pull", task_id, "-o", str(out), "--coordinator",
                        coordinator.target, cwd=rows.parent)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        stop_all(agents)
        coordinator.stop()

    monkeypatch.syspath_prepend(str(APP_DIR))
    fedcoord.load_app("custom_app:app")
    model = fedcoord.load_model(TASK_FILE, out)
    data = np.loadtxt(rows, delimiter=",", skiprows=1, dtype=np.float32)
    x, y = torch.from_numpy(data[:, 1:-1]), torch.from_numpy(data[:, -1]).long()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.6, f"the trained model beats chance (0.25) clearly, got {accuracy:.3f}"
