"""Settings of `coordinator serve` and `agent run`: flags > FEDCOORD_<KEY> > the config file
(--config or $FEDCOORD_CONFIG) > built-in defaults; a bad file fails before anything starts,
naming the file and the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import fedctl.main as fedctl_main
from fedctl.main import main


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """The arguments `coordinator serve` and `agent run` would start with (nothing starts)."""
    seen: list[argparse.Namespace] = []

    def capture(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(fedctl_main, "cmd_serve", capture)
    monkeypatch.setattr(fedctl_main, "cmd_agent_run", capture)
    for name in ("FEDCOORD_CONFIG", "FEDCOORD_PORT", "FEDCOORD_DB", "FEDCOORD_DATA",
                 "FEDCOORD_INSECURE", "FEDCOORD_RATE_LIMIT", "FEDCOORD_DEVICES",
                 "FEDCOORD_ENROLLMENT_TOKEN", "FEDCOORD_APP"):
        monkeypatch.delenv(name, raising=False)
    return seen


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fedcoord.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(captured: list[argparse.Namespace]) -> None:
    assert main(["coordinator", "serve"]) == 0
    args = captured[0]
    assert (args.port, args.db, args.insecure, args.rate_limit) == (
        7070, "sqlite:///fedcoord.db", False, [])


def test_config_file_overrides_defaults(tmp_path: Path, captured: list[argparse.Namespace]
                                        ) -> None:
    path = _toml(tmp_path, '[coordinator]\nport = 7100\ndb = "sqlite:///x.db"\n'
                           'insecure = true\nmax-chunk-bytes = 4096\n')
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    args = captured[0]
    assert (args.port, args.db, args.insecure, args.max_chunk_bytes) == (
        7100, "sqlite:///x.db", True, 4096)


def test_env_overrides_config_file_and_flag_overrides_env(
        tmp_path: Path, captured: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(tmp_path, "[coordinator]\nport = 7100\n")
    monkeypatch.setenv("FEDCOORD_PORT", "7200")
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    assert captured[-1].port == 7200
    assert main(["coordinator", "serve", "--config", str(path), "--port", "7300"]) == 0
    assert captured[-1].port == 7300
    assert main(["coordinator", "serve", "--config", str(path), "--port=7301"]) == 0
    assert captured[-1].port == 7301


def test_config_file_from_FEDCOORD_CONFIG(tmp_path: Path, captured: list[argparse.Namespace],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("agent:\n  data: digits:shard=0/4\n  devices: 3\n  coordinator: c:7070\n")
    monkeypatch.setenv("FEDCOORD_CONFIG", str(path))
    assert main(["agent", "run"]) == 0
    args = captured[0]
    assert (args.data, args.devices, args.coordinator) == ("digits:shard=0/4", 3, "c:7070")


def test_flag_config_wins_over_FEDCOORD_CONFIG(tmp_path: Path, captured: list[argparse.Namespace],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCOORD_CONFIG", str(_toml(tmp_path, "[coordinator]\nport = 1\n")))
    other = tmp_path / "other.yaml"
    other.write_text("coordinator: {port: 2}\n")
    assert main(["coordinator", "serve", "--config", str(other)]) == 0
    assert captured[0].port == 2


def test_one_file_holds_both_commands(tmp_path: Path, captured: list[argparse.Namespace]) -> None:
    path = _toml(tmp_path, '[coordinator]\nport = 7100\n[agent]\ndata = "synthetic:shard=0/2"\n')
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    assert main(["agent", "run", "--config", str(path)]) == 0
    assert captured[0].port == 7100 and captured[1].data == "synthetic:shard=0/2"


def test_unknown_key_is_an_error_naming_the_file_and_the_key(
        tmp_path: Path, captured: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _toml(tmp_path, "[coordinator]\nprot = 7100\n")
    assert main(["coordinator", "serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: key 'coordinator.prot' is not a setting of `fedctl coordinator serve`" in err
    assert "port" in err and not captured


def test_unknown_key_of_the_other_command_fails_too(
        tmp_path: Path, captured: list[argparse.Namespace], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _toml(tmp_path, "[coordinator]\nport = 1\n[agent]\ndb = 'x'\n")
    assert main(["coordinator", "serve", "--config", str(path)]) == 2
    assert "key 'agent.db' is not a setting of `fedctl agent run`" in capsys.readouterr().err


def test_unknown_table_is_an_error(tmp_path: Path, captured: list[argparse.Namespace],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _toml(tmp_path, "[coordinatr]\nport = 1\n")
    assert main(["coordinator", "serve", "--config", str(path)]) == 2
    assert f"{path}: unknown table 'coordinatr' (known: coordinator, agent)" in \
        capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), [
    ("[coordinator]\nport = 'seventy'\n", "key 'coordinator.port': expected int, got 'seventy'"),
    ("[coordinator]\ninsecure = 'yes'\n", "key 'coordinator.insecure': expected true or false"),
    ("[coordinator]\nenrollment = 'closed'\n",
     "key 'coordinator.enrollment': expected one of open, token, allow-list"),
    ("[coordinator]\nport = [1, 2]\n", "key 'coordinator.port': expected a single value"),
    ("[coordinator\n", "not valid TOML"),
])
def test_a_bad_value_names_the_file_and_key(tmp_path: Path, captured: list[argparse.Namespace],
                                            capsys: pytest.CaptureFixture[str], text: str,
                                            message: str) -> None:
    path = _toml(tmp_path, text)
    assert main(["coordinator", "serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err, err
    assert not captured


def test_a_missing_config_file_is_an_error(tmp_path: Path, captured: list[argparse.Namespace],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert f"config file {tmp_path / 'nope.toml'}: No such file" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "value", "message"), [
    ("FEDCOORD_PORT", "x", "$FEDCOORD_PORT: expected int, got 'x'"),
    ("FEDCOORD_INSECURE", "maybe", "$FEDCOORD_INSECURE: expected true or false"),
])
def test_a_bad_environment_variable_is_named(captured: list[argparse.Namespace],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], name: str,
                                             value: str, message: str) -> None:
    monkeypatch.setenv(name, value)
    assert main(["coordinator", "serve"]) == 2
    assert message in capsys.readouterr().err


def test_switches_from_the_environment(captured: list[argparse.Namespace],
                                       monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = _toml(tmp_path, "[coordinator]\ninsecure = true\n")
    monkeypatch.setenv("FEDCOORD_INSECURE", "0")
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    assert captured[-1].insecure is False
    monkeypatch.setenv("FEDCOORD_INSECURE", "yes")
    assert main(["coordinator", "serve"]) == 0
    assert captured[-1].insecure is True


def test_lists_from_file_env_and_flags_replace_each_other(
        tmp_path: Path, captured: list[argparse.Namespace], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _toml(tmp_path, '[coordinator]\nrate_limit = ["device-checkin=1/2"]\n')
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    assert captured[-1].rate_limit == ["device-checkin=1/2"]
    monkeypatch.setenv("FEDCOORD_RATE_LIMIT", "peer-checkin=3/4, peer-enroll=5/6")
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    assert captured[-1].rate_limit == ["peer-checkin=3/4", "peer-enroll=5/6"]
    assert main(["coordinator", "serve", "--config", str(path),
                 "--rate-limit", "device-checkin=7/8"]) == 0
    assert captured[-1].rate_limit == ["device-checkin=7/8"]


def test_relative_paths_in_a_file_are_relative_to_the_file(
        tmp_path: Path, captured: list[argparse.Namespace]) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "fedcoord.toml"
    path.write_text('[coordinator]\nstore = "models"\ntls = "/abs/certs"\n')
    assert main(["coordinator", "serve", "--config", str(path)]) == 0
    assert captured[0].store == tmp_path / "etc" / "models"
    assert captured[0].tls == Path("/abs/certs")


def test_enrollment_token_from_its_variable(captured: list[argparse.Namespace],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCOORD_ENROLLMENT_TOKEN", "fce_secret")
    assert main(["agent", "run", "--data", "digits:shard=0/2"]) == 0
    assert captured[0].enrollment_token == "fce_secret"


def test_agent_without_data_anywhere_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCOORD_DATA", raising=False)
    monkeypatch.delenv("FEDCOORD_CONFIG", raising=False)
    assert main(["agent", "run"]) == 2
    assert "agent run needs --data" in capsys.readouterr().err


def test_every_documented_key_is_a_setting() -> None:
    """The README's table of keys and the commands' flags agree."""
    from fedctl.config import settings_of

    parser = fedctl_main.build_parser()
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for table, command in parser.settings_parsers.items():
        for key in settings_of(command):
            assert f"`{key}`" in readme, f"README does not document [{table}] {key}"


def test_demo_agents_ignore_this_shells_agent_settings() -> None:
    from fedctl.demo import _without_agent_settings

    env = _without_agent_settings({"FEDCOORD_CONFIG": "/etc/fedcoord.toml", "FEDCOORD_DATA": "x",
                                   "FEDCOORD_TASK": "t", "FEDCOORD_TOKEN": "tok", "PATH": "/bin"})
    assert env == {"FEDCOORD_TOKEN": "tok", "PATH": "/bin"}


@pytest.mark.parametrize("value", ["0", "0.1", "nan", "7200"])
def test_a_retry_after_cap_out_of_range_is_refused_before_anything_starts(
        value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCOORD_CONFIG", raising=False)
    monkeypatch.delenv("FEDCOORD_RETRY_AFTER_MAX", raising=False)
    assert main(["coordinator", "serve", "--retry-after-max", value]) == 2
    assert f"--retry-after-max {float(value):g}: expected seconds from 0.2 to 3600" in \
        capsys.readouterr().err
