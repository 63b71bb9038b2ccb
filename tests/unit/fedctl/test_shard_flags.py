"""`fedctl coordinator serve --aggregator`: shard settings that cannot work are refused before
anything starts (exit status 2), naming the flag or the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedctl.main import main


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FEDCOORD_CONFIG", "FEDCOORD_AGGREGATOR", "FEDCOORD_SHARD_KEY_FILE",
                 "FEDCOORD_SHARD_CA", "FEDCOORD_INSECURE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "shard.key"
    path.write_text("ab" * 32 + "\n")
    return path


def serve(*flags: str) -> int:
    return main(["coordinator", "serve", *flags])


def test_shard_settings_without_aggregator_are_refused(
        key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert serve("--shard-key-file", str(key_file)) == 2
    assert "--shard-key-file and --shard-ca are settings of --aggregator" in \
        capsys.readouterr().err


def test_shards_need_the_key_they_were_started_with(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert serve("--aggregator", "127.0.0.1:7071") == 2
    assert "--aggregator needs --shard-key-file" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    (b"short", "a shard key is 32 bytes or 64 hex characters; this holds 5 bytes"),
    (b"zz" * 32, "64 hex characters"),
])
def test_a_key_file_that_is_not_a_key_is_refused_naming_the_file(
        tmp_path: Path, content: bytes, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    assert serve("--aggregator", "127.0.0.1:7071", "--shard-key-file", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"--shard-key-file {bad}" in err and message in err


def test_a_missing_key_file_is_refused_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.key"
    assert serve("--aggregator", "127.0.0.1:7071", "--shard-key-file", str(missing)) == 2
    assert f"--shard-key-file {missing}: No such file or directory" in capsys.readouterr().err


@pytest.mark.parametrize(("addresses", "message"), [
    (["127.0.0.1"], "--aggregator '127.0.0.1': expected HOST:PORT"),
    (["127.0.0.1:0"], "--aggregator '127.0.0.1:0': expected HOST:PORT"),
    (["127.0.0.1:7071,127.0.0.1:7071"], "--aggregator: an address is given twice"),
    (["shard-0.example.org:7071"], "--aggregator shard-0.example.org:7071: a shard off this "
                                   "machine needs TLS (--shard-ca"),
])
def test_shard_addresses_that_cannot_work_are_refused(
        key_file: Path, addresses: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    flags = [flag for a in addresses for flag in ("--aggregator", a)]
    assert serve(*flags, "--shard-key-file", str(key_file)) == 2
    assert message in capsys.readouterr().err
