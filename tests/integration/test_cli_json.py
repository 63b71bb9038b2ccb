"""fedctl for scripts, against a real coordinator process: the coordinator started from a
config file prints its startup line into a pipe at once, and every --json command prints
exactly one JSON document (JSON lines for watch) on stdout."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import ADMIN_TOKEN_FILE, ENV, FEDCTL

pytestmark = pytest.mark.integration

TASK = """\
name: json-cli
model: {architecture: logistic_regression, arguments: {input_dim: 64, num_classes: 10}}
rounds: 2
clients_per_round: 2
min_reports: 1
round_deadline_s: 60
"""


def _fedctl(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCTL, *argv], capture_output=True, text=True, env=env, timeout=60)


def _json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def test_serve_from_a_config_file_and_script_every_json_command(tmp_path: Path) -> None:
    config = tmp_path / "fedcoord.toml"
    config.write_text(f'[coordinator]\ndb = "sqlite:///{tmp_path}/c.db"\nstore = "models"\n'
                      f'admin_token_file = "{ADMIN_TOKEN_FILE}"\n')
    # No PYTHONUNBUFFERED: the line must be flushed by fedcoord itself.
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([*FEDCTL, "coordinator", "serve", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**env, "FEDCOORD_CONFIG": str(config)})
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        first = lines.get(timeout=60)
        assert proc.poll() is None and "coordinator listening on 127.0.0.1:" in first
        target = first.split(" on ", 1)[1].split()[0]
        assert (tmp_path / "models").is_dir()  # a relative path of the file: beside the file

        task_file = tmp_path / "task.yaml"
        task_file.write_text(TASK)
        task = _json(_fedctl("task", "launch", str(task_file), "--coordinator", target,
                             "--json", env=env))
        task_id = task["task_id"]
        assert task["state"] == "running" and task["spec"]["rounds"] == 2

        listed = _json(_fedctl("task", "list", "--coordinator", target, "--json", env=env))
        assert [t["task_id"] for t in listed["tasks"]] == [task_id]

        status = _json(_fedctl("task", "status", task_id, "--coordinator", target, "--json",
                               env=env))
        assert status["task"]["task_id"] == task_id
        assert status["task"]["created_at"].endswith("Z")
        assert isinstance(status["task"]["declines_by_reason"], dict)
        assert status["rounds"][0]["round_number"] == 1

        pulled = _json(_fedctl("model", "pull", task_id, "-o", str(tmp_path / "new" / "m.st"),
                               "--coordinator", target, "--json", env=env))
        assert pulled["version"] == 0 and (tmp_path / "new" / "m.st").stat().st_size == \
            pulled["size_bytes"]

        watch = subprocess.Popen([*FEDCTL, "task", "watch", task_id, "--coordinator", target,
                                  "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        time.sleep(2)
        assert _fedctl("task", "cancel", task_id, "--coordinator", target, env=env
                       ).returncode == 0
        out, err = watch.communicate(timeout=60)
        events = [json.loads(line) for line in out.splitlines()]
        assert watch.returncode == 1, err  # cancelled: not completed
        assert events[0]["event"] == "task" and events[-1]["event"] == "end"
        assert events[-1]["task"]["state"] == "cancelled"
        assert any(e["event"] == "round" for e in events)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_task_commands_against_no_coordinator_say_so_in_one_line(tmp_path: Path) -> None:
    task_file = tmp_path / "task.yaml"
    task_file.write_text(TASK)
    env = dict(ENV, FEDCOORD_CONFIG=os.devnull)  # not read by task commands
    for argv in (["task", "launch", str(task_file)], ["task", "status", "x"],
                 ["model", "pull", "x", "-o", str(tmp_path / "m")]):
        result = _fedctl(*argv, "--coordinator", "127.0.0.1:1", env=env)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("fedctl: error: UNAVAILABLE: cannot reach the "
                                        "coordinator at 127.0.0.1:1"), result.stderr
        assert "Traceback" not in result.stderr and "refused the task" not in result.stderr
