"""The task file's privacy section: what each mode requires, and errors naming file and field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from core.errors import CoreError
from core.privacy import (
    AccountingMethod,
    AdaptiveClip,
    FixedClip,
    LocalDp,
    PrivacyMode,
    PrivacySpec,
    PrivacySpecError,
    Sampling,
    privacy_from_dict,
    privacy_to_dict,
)

SRC = "tasks/dp.yaml"
CENTRAL: dict[str, Any] = {"mode": "central", "noise_multiplier": 1.0, "delta": 1e-5,
                           "clip": 0.5, "population": 1000, "max_epsilon": 10.0}


def parse(raw: Any) -> PrivacySpec:
    return privacy_from_dict(raw, SRC)


def test_a_missing_section_or_mode_off_means_no_privacy() -> None:
    assert parse(None) == PrivacySpec(mode=PrivacyMode.OFF)
    assert parse({"mode": "off"}) == PrivacySpec()
    assert parse({}) == PrivacySpec()


def test_central_dp_with_a_fixed_clip() -> None:
    assert parse(CENTRAL) == PrivacySpec(
        mode=PrivacyMode.CENTRAL, noise_multiplier=1.0, delta=1e-5, clip=FixedClip(0.5),
        sampling=Sampling.FIXED_SIZE, accounting=AccountingMethod.RDP, population=1000,
        max_epsilon=10.0)


def test_distributed_dp_with_a_target_epsilon_adaptive_clip_and_noise_floor() -> None:
    spec = parse(yaml.safe_load("""
        mode: distributed
        target_epsilon: 8
        delta: 1.0e-6
        clip: {target_quantile: 0.5, initial: 0.1, learning_rate: 0.2, bit_noise: 5}
        sampling: fixed
        min_noise_multiplier: 0.7
        population: 5000
        max_epsilon: 9
    """))
    assert spec == PrivacySpec(
        mode=PrivacyMode.DISTRIBUTED, target_epsilon=8.0, delta=1e-6,
        clip=AdaptiveClip(target_quantile=0.5, initial_l2_clip_norm=0.1, learning_rate=0.2,
                          bit_noise_std=5.0),
        sampling=Sampling.FIXED_SIZE, min_noise_multiplier=0.7, population=5000,
        max_epsilon=9.0)
    assert spec.budget == 9.0


def test_local_dp() -> None:
    spec = parse({"mode": "local", "local": {"noise_multiplier": 1.1, "max_grad_norm": 1.0,
                                             "delta": 1e-5, "max_epsilon": 8.0}})
    assert spec == PrivacySpec(mode=PrivacyMode.LOCAL, local=LocalDp(1.1, 1.0, 1e-5, 8.0))


@pytest.mark.parametrize("raw", [
    CENTRAL,
    {"mode": "off"},
    {"mode": "local", "local": {"noise_multiplier": 1.1, "max_grad_norm": 1.0, "delta": 1e-5,
                                "max_epsilon": 8.0}},
    {"mode": "distributed", "target_epsilon": 3.0, "delta": 1e-5, "accounting": "prv",
     "sampling": "poisson", "population": 200, "max_epsilon": 4.0,
     "clip": {"target_quantile": 0.7, "initial": 1.0, "learning_rate": 0.1, "bit_noise": 2.0}},
])
def test_specs_round_trip_through_plain_data(raw: dict[str, Any]) -> None:
    spec = parse(raw)
    assert parse(privacy_to_dict(spec)) == spec


@pytest.mark.parametrize("raw, field, message", [
    ([], "privacy", "expected a mapping"),
    ({**CENTRAL, "nois_multiplier": 1.0}, "privacy.nois_multiplier", "unknown field"),
    ({**CENTRAL, "mode": "global"}, "privacy.mode", "expected one of 'off', 'central'"),
    ({"mode": "off", "delta": 1e-5}, "privacy.delta", "not allowed when mode is 'off'"),
    ({**CENTRAL, "target_epsilon": 3.0}, "privacy.noise_multiplier", "exactly one"),
    ({k: v for k, v in CENTRAL.items() if k != "noise_multiplier"},
     "privacy.noise_multiplier", "exactly one"),
    ({**CENTRAL, "noise_multiplier": 0}, "privacy.noise_multiplier", "must be positive"),
    ({**CENTRAL, "noise_multiplier": True}, "privacy.noise_multiplier", "expected a number"),
    ({**CENTRAL, "delta": "1e-5"}, "privacy.delta", "write 1.0e-5"),
    ({**CENTRAL, "delta": 1.5}, "privacy.delta", r"must be in \(0, 1\)"),
    ({k: v for k, v in CENTRAL.items() if k != "delta"}, "privacy.delta", "is required"),
    ({k: v for k, v in CENTRAL.items() if k != "clip"}, "privacy.clip", "is required"),
    ({**CENTRAL, "clip": "big"}, "privacy.clip", "expected an L2 norm"),
    ({**CENTRAL, "clip": -1.0}, "privacy.clip", "must be positive"),
    ({**CENTRAL, "clip": {"target_quantile": 0.5}}, "privacy.clip.initial", "is required"),
    ({**CENTRAL, "clip": {"target_quantile": 1.5, "initial": 1, "learning_rate": 1,
                          "bit_noise": 5}}, "privacy.clip.target_quantile", r"in \(0, 1\)"),
    ({**CENTRAL, "clip": {"target_quantile": 0.5, "initial": 1, "learning_rate": 1,
                          "bit_noise": 0.4}}, "privacy.clip.bit_noise", "must exceed"),
    ({**CENTRAL, "sampling": "uniform"}, "privacy.sampling", "'poisson', 'fixed'"),
    ({**CENTRAL, "sampling": "fixed", "accounting": "prv"}, "privacy.accounting",
     "Poisson sampling only"),
    ({**CENTRAL, "min_noise_multiplier": 0.5}, "privacy.min_noise_multiplier",
     "only allowed when mode is 'distributed'"),
    ({**CENTRAL, "mode": "distributed", "min_noise_multiplier": 2.0},
     "privacy.min_noise_multiplier", "exceeds noise_multiplier"),
    ({**CENTRAL, "local": {}}, "privacy.local", "only allowed when mode is 'local'"),
    ({k: v for k, v in CENTRAL.items() if k != "population"}, "privacy.population",
     "is required"),
    ({**CENTRAL, "population": 0}, "privacy.population", "positive integer"),
    ({k: v for k, v in CENTRAL.items() if k != "max_epsilon"}, "privacy.max_epsilon",
     "is required with noise_multiplier"),
    ({**CENTRAL, "population": 10.5}, "privacy.population", "positive integer"),
    ({**{k: v for k, v in CENTRAL.items() if k != "noise_multiplier"}, "target_epsilon": 4.0,
      "max_epsilon": 3.0}, "privacy.max_epsilon", "below target_epsilon"),
    ({"mode": "local"}, "privacy.local", "is required"),
    ({"mode": "local", "delta": 1e-5, "local": {}}, "privacy.delta", "not allowed"),
    ({"mode": "local", "local": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}},
     "privacy.local.delta", "is required"),
    ({"mode": "local", "local": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}},
     "privacy.local.max_epsilon", "is required"),
    ({"mode": "local", "local": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5,
                                 "epochs": 2}}, "privacy.local.epochs", "unknown field"),
])
def test_invalid_sections_fail_naming_the_file_and_field(raw: Any, field: str,
                                                         message: str) -> None:
    with pytest.raises(PrivacySpecError, match=message) as info:
        parse(raw)
    assert info.value.source == SRC and info.value.field == field
    assert str(info.value).startswith(f"{SRC}: field '{field}': ")
    assert isinstance(info.value, CoreError)
