"""`fedctl demo` end to end, small: its last line is the JSON summary."""

from __future__ import annotations

import json
import subprocess

import pytest
from harness import ENV, FEDCTL_CMD

pytestmark = pytest.mark.integration


def test_demo_prints_one_json_line_with_per_round_accuracy() -> None:
    # One agent process (each costs seconds of start-up: torch); the secure demo below
    # spreads its devices over two.
    result = subprocess.run([*FEDCTL_CMD, "demo", "--devices", "6", "--rounds", "2",
                             "--processes", "1", "--json"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, "--json prints only the summary"
    summary = json.loads(lines[0])
    assert summary["rounds_completed"] == 2 and summary["state"] == "completed"
    assert len(summary["accuracy"]) == 2
    assert 0.3 < summary["final_accuracy"] <= 1.0
    assert summary["wall_seconds"] > 0 and summary["task_id"]
    assert summary["tls"] is True, "the demo's coordinator serves TLS"


def test_demo_with_secure_aggregation_reports_the_protocol_it_ran() -> None:
    # One round runs the whole protocol (and reaches ~0.7 accuracy: 0.73 in a run here).
    result = subprocess.run([*FEDCTL_CMD, "demo", "--devices", "10", "--rounds", "1",
                             "--processes", "2", "--json", "--secagg"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["state"] == "completed" and summary["secure_aggregation"] is True
    assert summary["secagg"]["secagg_threshold"] <= summary["secagg"]["secagg_neighbours"] + 1
    assert 0.3 < summary["final_accuracy"] <= 1.0
