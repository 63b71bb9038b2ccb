"""`fedctl coordinator serve --checkin-pace`: the pace steering rate, a setting like any
flag (`checkin_pace` in the [coordinator] table), refused out of range before anything
starts."""

from __future__ import annotations

import pytest

import fedctl.main as fedctl_main
from fedctl.main import main


def test_checkin_pace_is_a_coordinator_setting_with_the_settings_default() -> None:
    from coordinator.settings import CoordinatorSettings
    from fedctl.config import settings_of

    parser = fedctl_main.build_parser()
    assert "checkin_pace" in settings_of(parser.settings_parsers["coordinator"])
    args = parser.parse_args(["coordinator", "serve"])
    assert args.checkin_pace == CoordinatorSettings().checkin_pace_per_s
    assert parser.parse_args(["coordinator", "serve", "--checkin-pace", "0.5"]).checkin_pace \
        == 0.5


@pytest.mark.parametrize("value", ["-1", "nan", "2e6"])
def test_a_checkin_pace_out_of_range_is_refused_before_anything_starts(
        value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDCOORD_CONFIG", raising=False)
    monkeypatch.delenv("FEDCOORD_CHECKIN_PACE", raising=False)
    assert main(["coordinator", "serve", "--checkin-pace", value]) == 2
    assert f"--checkin-pace {float(value):g}: expected check-ins per second" in \
        capsys.readouterr().err
