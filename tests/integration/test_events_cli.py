"""`fedctl events` against a real coordinator process and one agent process: a 2-round
task's events come back from the coordinator's database in seq order, and --follow prints
them as they happen and exits 0 when the task completes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    ENV,
    FEDCTL,
    CoordinatorProcess,
    fedctl_at_once,
    shared_coordinator,
    start_agent,
    write_task,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    yield from shared_coordinator(tmp_path_factory)


def _records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_events_of_a_two_round_task_listed_and_followed(
        coordinator: CoordinatorProcess, tmp_path: Path) -> None:
    task_file = write_task(tmp_path / "task.yaml", rounds=2, clients_per_round=1,
                           min_reports=1, selection_window_s=0.2)
    launched = subprocess.run([*FEDCTL, "task", "launch", str(task_file), "--coordinator",
                               coordinator.target], capture_output=True, text=True, env=ENV,
                              timeout=120)
    assert launched.returncode == 0, launched.stderr
    task_id = launched.stdout.strip()
    follow = subprocess.Popen([*FEDCTL, "events", "--task", task_id, "--follow", "--json",
                               "--coordinator", coordinator.target], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV)
    agent = start_agent(coordinator.target, "solo", "digits:shard=0/4", task_id=task_id,
                        log=tmp_path / "agent.log")
    try:
        followed, err = follow.communicate(timeout=240)
    finally:
        follow.kill()
        agent.wait(timeout=60)
    assert follow.returncode == 0, err + coordinator.log_text()

    at = ["--coordinator", coordinator.target]
    listed, after, text, unknown = fedctl_at_once(
        ["events", "--task", task_id, "--json", *at],
        ["events", "--task", task_id, "--after", "3", "--json", *at],
        ["events", "--task", task_id, *at], ["events", "--task", "no-such-task", *at])
    assert listed.returncode == 0, listed.stderr
    records = _records(listed.stdout)
    kinds = [r["kind"] for r in records]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert kinds[0] == "task_created" and kinds.count("round_committed") == 2
    assert "task_ended" in kinds and all(r["task_id"] == task_id for r in records)
    committed = [r for r in records if r["kind"] == "round_committed"]
    assert [r["round_number"] for r in committed] == [1, 2]
    assert {"version", "selected", "seconds"} <= set(committed[0]["values"])
    # --follow printed the same records, ending with the task's end.
    assert _records(followed) == records[: len(_records(followed))]
    assert "task_ended" in [r["kind"] for r in _records(followed)]

    assert _records(after.stdout) == records[3:]
    assert text.returncode == 0 and len(text.stdout.splitlines()) == len(records)
    assert "round_committed" in text.stdout

    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("fedctl: error: NOT_FOUND: no task"), unknown.stderr
