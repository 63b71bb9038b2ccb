"""kill -9 the coordinator mid-round, restart it on the same database: the task completes,
committed model versions are untouched, and no round is committed twice."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest
from harness import CoordinatorProcess, start_agent, stop_all, wait_for_task, write_task

pytestmark = pytest.mark.integration


def committed_versions(db: Path, store: Path, task_id: str) -> dict[int, str]:
    """version -> sha256 of the file on disk, for every version the database references."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT version, path, sha256 FROM model_versions WHERE task_id = ?", (task_id,)
        ).fetchall()
    out = {}
    for version, path, recorded in rows:
        actual = hashlib.sha256((store / path).read_bytes()).hexdigest()
        assert actual == recorded, f"model v{version} on disk differs from its record"
        out[int(version)] = actual
    return out


def test_a_killed_coordinator_resumes_the_task_without_double_commits(
    coordinator: CoordinatorProcess, tmp_path: Path
) -> None:
    # Three rounds: the kill comes in round 2 or 3, once round 1 is committed.
    task_file = write_task(tmp_path / "t.yaml", rounds=3, clients_per_round=4, min_reports=4,
                           selection_window_s=0.5, round_deadline_s=20)
    with coordinator.admin() as admin:
        from core.taskspec import load_task_file

        task_id = admin.create_task(load_task_file(task_file)).task_id
    # One agent process hosts the 4 devices (each process costs seconds of start-up: torch).
    agents = [start_agent(coordinator.target, "a", "digits:shard=0/4,dirichlet=0.5",
                          devices=4, task_id=task_id, log=tmp_path / "a.log")]
    try:
        # Wait until at least one round is committed and the next one has an update in it.
        deadline = time.monotonic() + 120
        with coordinator.admin() as admin:
            while True:
                task = admin.get_task(task_id)
                cur = task.current_round
                if task.rounds_committed >= 1 and task.HasField("current_round") and (
                        cur.reports >= 1 and cur.state in ("selecting", "training")):
                    break
                assert task.state == "running", f"task ended before the kill: {task.state}"
                assert time.monotonic() < deadline, "never caught a round in flight"
                time.sleep(0.01)
        coordinator.kill9()
        db = tmp_path / "coordinator.db"
        before = committed_versions(db, tmp_path / "store", task_id)
        assert len(before) >= 2  # v0 and at least v1

        coordinator.start()
        with coordinator.admin() as admin:
            task = wait_for_task(admin, task_id, timeout_s=180)
            rounds = admin.list_rounds(task_id)
        assert task.state == "completed", coordinator.log_text()
        assert [stop_all([a]) for a in agents]  # agents are done or stop cleanly
    finally:
        stop_all(agents)

    after = committed_versions(db, tmp_path / "store", task_id)
    assert {v: after[v] for v in before} == before, "a committed model version changed"
    assert sorted(after) == list(range(4))
    committed = [r.round_number for r in rounds if r.state == "committed"]
    assert sorted(committed) == [1, 2, 3], "each round committed exactly once"
    interrupted = [r for r in rounds if r.state == "failed"]
    assert any("restarted" in r.failure_reason for r in interrupted)
    for r in rounds:
        if r.state == "committed":
            assert r.metrics["reports"] == r.reports, "aggregate used only its own attempt"
