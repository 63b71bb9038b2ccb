"""A short coverage-guided fuzzing run (benchmarks/fuzz.py, atheris) over every RPC, every
wire conversion and the secure-aggregation scenario: no request may end in an unmapped
exception (INTERNAL or UNKNOWN), a hang or a memory blow-up. The long runs (a million inputs
and more) are recorded in the issue's notes; this one catches regressions in ``make test``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (the dev extra) is not installed")

ROOT = Path(__file__).resolve().parents[2]
#: A fixed number of inputs, not a time box: under load (CI runs tests three at a time on two
#: cores) ten seconds gave 809 inputs once, so a count keeps the run the same on any machine.
EXECS = 1200
#: Findings reported and not yet fixed, each counted apart, never hidden (none open: the
#: unbounded SecAggPlan.value_bits hang and the phase_timeout round-trip are fixed).
KNOWN: list[str] = []


@pytest.mark.slow
def test_a_short_fuzzing_run_finds_no_crash(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--execs", str(EXECS),
         "--target", "all", "--target", "scenario", "--crash-dir", str(tmp_path),
         *(arg for known in KNOWN for arg in ("--known-crash", known))],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    result = json.loads(lines[-1])
    # Each finding comes with its reproducer (and --replay input) on stderr.
    assert result["crashes"] == 0, proc.stderr[-8000:]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert result["executions"] >= EXECS, result
    assert result["coverage"]["edges"] > 0, result
    assert any(a.startswith("fedcoord.v1.DeviceService/") for a in result["actions"])
    assert any(a.startswith("convert/") for a in result["actions"])
