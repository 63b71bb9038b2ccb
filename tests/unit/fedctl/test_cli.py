"""The command line: instant help, example task files that parse, errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.taskspec import load_task_file
from fedctl.main import main

ROOT = Path(__file__).resolve().parents[3]


def test_help_does_not_import_torch_or_grpc() -> None:
    code = (
        "import sys\n"
        "from fedctl.main import build_parser\n"
        "build_parser().format_help()\n"
        "assert 'torch' not in sys.modules and 'grpc' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_task_file_is_valid(path: Path) -> None:
    load_task_file(path)


def test_launching_a_bad_file_names_it_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    bad = tmp_path / "task.yaml"
    bad.write_text("name: x\nmodel: {architecture: mlp}\nrounds: 1\nclients_per_round: 2\n"
                   "min_reports: 5\n")
    assert main(["task", "launch", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: field 'min_reports'" in err


def test_unreachable_coordinator_is_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "list", "--coordinator", "127.0.0.1:1"]) == 1
    assert "cannot reach the coordinator at 127.0.0.1:1" in capsys.readouterr().err
