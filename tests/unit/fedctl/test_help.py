"""What a newcomer sees first: --version, defaults in every --help, -v anywhere, completion."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedctl.main import DEFAULT_RATE_LIMITS, build_parser, main

ROOT = Path(__file__).resolve().parents[3]


def _commands(parser: argparse.ArgumentParser, path: str = "fedctl"
              ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedctl {version('fedcoord')}"


def test_every_option_default_is_visible_in_help() -> None:
    missing = []
    for path, parser in _commands(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            default = action.default
            if (not action.option_strings or default in (None, False, "", [])
                    or default == argparse.SUPPRESS):
                continue
            if f"(default: {default})" not in text:
                missing.append(f"{path} {action.option_strings[-1]} (default {default})")
    assert not missing, missing


def test_rate_limit_help_names_the_settings_defaults() -> None:
    from coordinator.settings import SecuritySettings

    s = SecuritySettings()
    for name, rate in (("device-checkin", s.checkin_per_device),
                       ("peer-checkin", s.checkin_per_peer), ("peer-enroll", s.enroll_per_peer)):
        assert f"{name}={rate.per_second:g}/{rate.burst:g}" in DEFAULT_RATE_LIMITS


@pytest.mark.parametrize("argv", [
    ["-v", "task", "list"], ["task", "list", "-v"], ["task", "-v", "list"],
    ["agent", "run", "--data", "x", "-v"], ["coordinator", "serve", "--verbose"],
])
def test_verbose_is_accepted_before_or_after_the_command(argv: list[str]) -> None:
    assert build_parser().parse_args(argv).verbose is True


def test_without_verbose_it_is_off() -> None:
    assert build_parser().parse_args(["agent", "run"]).verbose is False


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_knows_the_commands(shell: str, capsys: pytest.CaptureFixture[str]
                                              ) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("coordinator", "agent", "task", "model", "--json", "--config"):
        assert word in script


def test_bash_completion_script_is_valid_bash(tmp_path: Path) -> None:
    script = tmp_path / "fedctl.bash"
    script.write_text(subprocess.run([sys.executable, "-m", "fedctl", "completion", "bash"],
                                     check=True, capture_output=True, text=True, cwd=ROOT).stdout)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from fedctl.main import build_parser\n"
        "for argv in (['--help'], ['agent', 'run', '--help'], ['task', 'status', '--help']):\n"
        "    try:\n"
        "        build_parser().parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = {'torch', 'grpc', 'shtab', 'rich', 'yaml'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
