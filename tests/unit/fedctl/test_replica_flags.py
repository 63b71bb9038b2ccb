"""`fedctl coordinator serve --replica` and `fedctl cluster up`: settings that cannot work are
refused before anything starts, naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedctl.main import main


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FEDCOORD_CONFIG", "FEDCOORD_REPLICA", "FEDCOORD_LEASE_TTL",
                 "FEDCOORD_ADVERTISE", "FEDCOORD_DB"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("flags", [["--lease-ttl", "2"], ["--advertise", "10.0.0.5:7070"]])
def test_replica_settings_without_replica_are_refused(
        flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coordinator", "serve", *flags]) == 2
    assert "--lease-ttl and --advertise are settings of --replica" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0.1", "nan", "3600"])
def test_a_lease_ttl_out_of_range_is_refused(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coordinator", "serve", "--replica", "--lease-ttl", value]) == 2
    assert f"--lease-ttl {float(value):g}: expected seconds from 0.5 to 600" in \
        capsys.readouterr().err


def test_a_replica_needs_a_shared_database(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["coordinator", "serve", "--replica", "--db", "memory://", "--port", "0",
                 "--store", str(tmp_path / "store")])
    assert code == 1
    assert "replicas share one database" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "0"], "--replicas 0: expected 1 to 16"),
    (["--replicas", "3", "--port", "65535"], "--port 65535: the 3 processes need ports up to"),
    (["--replicas", "2", "--aggregators", "2", "--port", "65533"],
     "--port 65533: the 4 processes need ports up to 65536"),
    (["--aggregators", "65"], "--aggregators 65: expected 0 to 64"),
    (["--lease-ttl", "0.1"], "--lease-ttl 0.1: expected seconds from 0.5 to 600"),
])
def test_cluster_up_refuses_what_cannot_start(
        flags: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cluster", "up", "--dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
