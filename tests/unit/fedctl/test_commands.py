"""The commands against a stand-in admin client: --json prints one JSON document (or JSON
lines) and nothing else on stdout; tables keep whole ids; a newcomer's mistakes get one line
that says what to do."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import fedctl.main as fedctl_main
from fedctl.admin import AdminError
from fedctl.main import main
from protos.fedcoord.v1 import admin_pb2

LONG_ID = "a-task-with-a-rather-long-name-0123456789abcdef-0123456789abcdef"


def _task(state: str = "running", **extra: Any) -> admin_pb2.Task:
    task = admin_pb2.Task(task_id=LONG_ID, state=state, rounds_committed=2, model_version=2,
                          created_unix_ms=1_796_000_000_000, metrics_release="masked", **extra)
    task.spec.name = "digits"
    task.spec.rounds = 3
    task.privacy.epsilon = 1.5
    task.privacy.delta = 1e-5
    task.privacy.budget = 8.0
    return task


def _round(n: int, state: str = "committed") -> admin_pb2.Round:
    r = admin_pb2.Round(round_number=n, attempt=1, state=state, selected=5, reports=4, goal=4,
                        started_unix_ms=1_796_000_000_000 + n * 10_000,
                        ended_unix_ms=1_796_000_000_000 + n * 10_000 + 2_500
                        if state == "committed" else 0,
                        model_version=n)
    r.metrics["dp_epsilon"] = 0.5 * n
    r.metrics["secagg_dropped"] = 1.0
    r.metrics["local_dp_epsilon"] = 2.25
    return r


class FakeAdmin:
    """The calls fedctl makes, answering from fixed messages (or raising ``error``)."""

    def __init__(self, task: admin_pb2.Task, rounds: list[admin_pb2.Round], *,
                 error: AdminError | BaseException | None = None) -> None:
        self.task, self.rounds, self.error = task, rounds, error
        self.polls = 0

    def __enter__(self) -> FakeAdmin:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        pass

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def get_task(self, task_id: str) -> admin_pb2.Task:
        self._check()
        self.polls += 1
        return self.task

    def list_rounds(self, task_id: str) -> list[admin_pb2.Round]:
        self._check()
        return self.rounds

    def list_tasks(self) -> list[admin_pb2.Task]:
        self._check()
        return [self.task]

    def create_task(self, spec: object) -> admin_pb2.Task:
        self._check()
        return self.task

    def pull_model(self, task_id: str, version: int, out: Path) -> tuple[int, str, int]:
        self._check()
        out.write_bytes(b"model")
        return 3, "ab" * 32, 5


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> FakeAdmin:
    fake = FakeAdmin(_task("completed"), [_round(1), _round(2)])
    fake.task.declines_by_reason["data does not fit the model"] = 3
    monkeypatch.setattr(fedctl_main, "_admin", lambda args: fake)
    return fake


def _only_json(out: str) -> Any:
    lines = out.splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_task_status_json_carries_every_field_and_metric(
        admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "status", LONG_ID, "--json"]) == 0
    doc = _only_json(capsys.readouterr().out)
    assert doc["task"]["task_id"] == LONG_ID
    assert doc["task"]["rounds_committed"] == 2  # a number, not the proto3 JSON string
    assert doc["task"]["privacy"]["epsilon"] == 1.5
    assert doc["task"]["declines_by_reason"] == {"data does not fit the model": 3}
    assert doc["task"]["created_at"] == "2026-11-30T00:53:20.000Z"
    assert doc["task"]["current_round"] is None
    first = doc["rounds"][0]
    assert first["metrics"] == {"dp_epsilon": 0.5, "secagg_dropped": 1.0,
                                "local_dp_epsilon": 2.25}
    assert first["duration_s"] == 2.5 and first["ended_at"].endswith("Z")


def test_task_status_table_shows_every_metric_times_and_declines(
        admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "status", LONG_ID]) == 0
    out = capsys.readouterr().out
    for text in (LONG_ID, "dp_epsilon", "secagg_dropped", "local_dp_epsilon", "2.25", "2.5s",
                 "declines_by_reason: data does not fit the model 3", "epsilon 1.500"):
        assert text in out, text


def test_tables_never_truncate_ids_when_piped(admin: FakeAdmin, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["task", "list"]) == 0
    out = capsys.readouterr().out
    assert LONG_ID in out and "…" not in out


def test_a_table_on_a_narrow_terminal_folds_ids_instead_of_cutting_them() -> None:
    from rich.console import Console
    from rich.table import Table

    from fedctl.watch import status_table

    buffer = io.StringIO()
    Console(file=buffer, width=60).print(status_table(_task(), [_round(1)]))
    assert "…" not in buffer.getvalue()
    assert isinstance(status_table(_task(), []), Table)


def test_task_list_json(admin: FakeAdmin, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "list", "--json"]) == 0
    doc = _only_json(capsys.readouterr().out)
    assert [t["task_id"] for t in doc["tasks"]] == [LONG_ID]


def test_task_launch_json_prints_the_task(admin: FakeAdmin, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    task_file = Path(__file__).resolve().parents[3] / "examples" / "digits_mlp.yaml"
    assert main(["task", "launch", str(task_file), "--json"]) == 0
    assert _only_json(capsys.readouterr().out)["task_id"] == LONG_ID
    assert main(["task", "launch", str(task_file)]) == 0
    assert capsys.readouterr().out == LONG_ID + "\n"


def test_task_watch_json_prints_json_lines_and_ends(admin: FakeAdmin,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "watch", LONG_ID, "--json"]) == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    assert [e["event"] for e in events] == ["task", "round", "round", "end"]
    assert events[1]["round"]["metrics"]["dp_epsilon"] == 0.5
    assert events[-1]["task"]["state"] == "completed"
    assert f"task {LONG_ID}: completed" in captured.err


def test_watch_emits_a_round_line_only_when_it_changes() -> None:
    from fedctl.watch import watch_json

    out = io.StringIO()

    class Changing(FakeAdmin):
        def get_task(self, task_id: str) -> admin_pb2.Task:
            task = super().get_task(task_id)
            if self.polls == 3:
                self.rounds[0].reports = 5
            if self.polls == 5:
                task.state = "completed"
            return task

    fake = Changing(_task("running"), [_round(1, "training")])
    task = watch_json(fake, LONG_ID, out=out, poll_s=0)  # type: ignore[arg-type]
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert task.state == "completed"
    assert events == ["task", "round", "round", "task", "end"]


def test_ctrl_c_in_watch_says_the_task_keeps_running(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeAdmin(_task(), [], error=KeyboardInterrupt())
    monkeypatch.setattr(fedctl_main, "_admin", lambda args: fake)
    assert main(["task", "watch", LONG_ID]) == 130
    err = capsys.readouterr().err
    assert f"task {LONG_ID} keeps running on the coordinator" in err
    assert f"fedctl task cancel {LONG_ID}" in err


def test_model_pull_into_missing_directory_creates_it(admin: FakeAdmin, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "missing" / "dir" / "model.safetensors"
    assert main(["model", "pull", LONG_ID, "-o", str(out), "--json"]) == 0
    assert out.read_bytes() == b"model"
    doc = _only_json(capsys.readouterr().out)
    assert doc == {"path": str(out), "task_id": LONG_ID, "version": 3, "size_bytes": 5,
                   "sha256": "ab" * 32}


def test_model_pull_into_a_folder_is_a_clear_error(admin: FakeAdmin, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "pull", LONG_ID, "-o", str(tmp_path)]) == 2
    assert f"-o {tmp_path} is a folder; give the file to write" in capsys.readouterr().err


def test_model_pull_where_a_folder_cannot_be_made_is_one_line(
        admin: FakeAdmin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["model", "pull", LONG_ID, "-o", str(tmp_path / "file" / "m.st")]) == 1
    err = capsys.readouterr().err
    assert "cannot create the folder" in err and "Traceback" not in err


def test_launch_against_an_unreachable_coordinator_says_so_not_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    task_file = Path(__file__).resolve().parents[3] / "examples" / "digits_mlp.yaml"
    assert main(["task", "launch", str(task_file), "--coordinator", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the coordinator at 127.0.0.1:1" in err
    assert "refused" not in err.replace("Connection refused", "")
    assert "fedctl coordinator serve" in err and "--ca FILE" in err


def test_every_command_words_unreachable_the_same() -> None:
    from fedctl.errors import cannot_reach

    plain = cannot_reach("h:1", "x")
    assert plain.startswith("cannot reach the coordinator at h:1 (x): check that a coordinator")
    assert "if it serves TLS, give --ca FILE" in plain
    assert "check --ca" in cannot_reach("h:1", tls=True)


def test_a_coordinators_own_unavailable_is_not_called_unreachable() -> None:
    from fedctl.admin import is_transport_failure

    assert is_transport_failure("failed to connect to all addresses; last error: ...")
    assert is_transport_failure("Socket closed")
    assert not is_transport_failure("cannot open database sqlite:///x.db: disk I/O error")


def test_postgresql_without_psycopg_names_the_install_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.chdir(tmp_path)
    assert main(["coordinator", "serve", "--db", "postgresql://u@127.0.0.1:1/db",
                 "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'fedcoord[postgres]'" in err and "psycopg" in err


def test_a_bad_app_is_a_usage_error_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    started = []
    monkeypatch.setattr("device_agent.app.run_agent", lambda *a, **k: started.append(1))
    assert main(["agent", "run", "--data", "digits:shard=0/2",
                 "--app", "no_such_module_xyz:app"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err and not started
    assert main(["coordinator", "serve", "--app", "not-an-app"]) == 2
    assert "expected MODULE:ATTRIBUTE" in capsys.readouterr().err


def test_agent_run_returns_exit_status_of_its_devices(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from device_agent.runtime.device import DeviceStats

    ok, failed = DeviceStats(), DeviceStats(failure="declined: no fit")
    outcomes = [[ok, failed], [failed, failed]]
    monkeypatch.setattr("device_agent.app.run_agent", lambda config, stop: outcomes.pop(0))
    argv = ["agent", "run", "--data", "digits:shard=0/4", "--devices", "2",
            "--state-dir", str(tmp_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("fedcoord agent device: 2 device(s) for coordinator ")
    assert main(argv) == 1
    assert "every device failed: declined: no fit" in capsys.readouterr().err


def test_agent_that_gave_up_says_it_cannot_reach_the_coordinator(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from device_agent.runtime.device import DeviceStats

    gave_up = DeviceStats(gave_up=True, finished_reason="unreachable for 1 s",
                          failure="unreachable for 1 s")
    monkeypatch.setattr("device_agent.app.run_agent", lambda config, stop: [gave_up])
    assert main(["agent", "run", "--data", "digits:shard=0/4", "--coordinator", "h:9",
                 "--state-dir", str(tmp_path)]) == 1
    assert "cannot reach the coordinator at h:9 (unreachable for 1 s)" in capsys.readouterr().err
