"""Task files: every mistake is reported with the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.taskspec import (
    TaskSpecError,
    load_task_file,
    parse_task_yaml,
    spec_from_dict,
    spec_to_dict,
)
from core.types import LocalOptimizerKind, ServerOptimizerKind

GOOD = """
name: digits
model:
  architecture: mlp
  arguments: {input_dim: 64, hidden: [32], num_classes: 10}
rounds: 3
clients_per_round: 4
min_reports: 2
local: {epochs: 2, batch_size: 8, optimizer: adam, learning_rate: 0.01}
server: {kind: fedadam, learning_rate: 0.1}
evaluation: {fraction: 0.5, server_data: "digits:split=test"}
"""


def test_a_valid_file_parses_into_a_task_spec() -> None:
    spec = parse_task_yaml(GOOD, source="t.yaml")
    assert spec.rounds == 3 and spec.clients_per_round == 4
    assert spec.local.optimizer is LocalOptimizerKind.ADAM
    assert spec.server.kind is ServerOptimizerKind.FEDADAM
    assert spec.model.arguments["hidden"] == [32]


def test_spec_round_trips_through_plain_data() -> None:
    spec = parse_task_yaml(GOOD)
    assert spec_from_dict(spec_to_dict(spec)) == spec


@pytest.mark.parametrize(
    ("edit", "field", "words"),
    [
        ("rounds: 0", "rounds", "between 1 and 1000000"),
        ("clients_per_round: 4000000000", "clients_per_round", "between 1 and 100000"),
        ("rounds: three", "rounds", "expected an integer"),
        ("min_reports: 9", "min_reports", "between 1 and clients_per_round"),
        ("over_selection: 0.5", "over_selection", "between 1.0 and 10.0"),
        ("roundz: 3", "roundz", "unknown field"),
        ("local: {epochs: 0}", "local.epochs", "at least 1"),
        ("local: {optimizer: lbfgs}", "local.optimizer", "one of 'sgd', 'adam'"),
        ("server: {kind: sgd}", "server.kind", "one of"),
        ("evaluation: {fraction: 2}", "evaluation.fraction", "[0, 1]"),
        ("round_deadline_s: .nan", "round_deadline_s", "finite"),
        ("model: mlp", "model", "expected a mapping"),
    ],
)
def test_a_bad_field_is_named_with_the_file(edit: str, field: str, words: str) -> None:
    with pytest.raises(TaskSpecError) as info:
        parse_task_yaml(GOOD + "\n" + edit + "\n", source="task.yaml")
    message = str(info.value)
    assert message.startswith("task.yaml: field '" + field + "'"), message
    assert words in message


def test_a_missing_required_field_is_named() -> None:
    with pytest.raises(TaskSpecError, match="field 'clients_per_round': is required"):
        parse_task_yaml("name: x\nmodel: {architecture: mlp}\nrounds: 1\nmin_reports: 1\n")


def test_yaml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(TaskSpecError, match=r"bad.yaml: top level: not valid YAML \(line"):
        load_task_file(path)


def test_a_missing_file_is_reported_not_raised_as_oserror(tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError, match="cannot read the file"):
        load_task_file(tmp_path / "nope.yaml")


def test_a_file_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(TaskSpecError, match="expected a mapping of task fields"):
        parse_task_yaml("- 1\n- 2\n", source="list.yaml")


SECURE = GOOD.replace("clients_per_round: 4", "clients_per_round: 20") + """\
secure_aggregation: {protocol: secagg+, neighbours: auto, threshold: auto, clip: 0.5, bits: auto,
                     dropout: 0.01}
"""


def test_secure_aggregation_is_off_by_default_and_auto_fields_mean_derived() -> None:
    assert parse_task_yaml(GOOD, source="t.yaml").secure_aggregation is None
    spec = parse_task_yaml(SECURE, source="t.yaml")
    sa = spec.secure_aggregation
    assert sa is not None and sa.neighbours is None and sa.bits is None and sa.clip == 0.5
    assert spec_from_dict(spec_to_dict(spec)) == spec
    explicit = parse_task_yaml(SECURE.replace("neighbours: auto", "neighbours: 24")
                               .replace("threshold: auto", "threshold: 0.7"), source="t.yaml")
    assert explicit.secure_aggregation is not None
    assert (explicit.secure_aggregation.neighbours, explicit.secure_aggregation.threshold) == (
        24, 0.7)


@pytest.mark.parametrize(("edit", "field", "words"), [
    ("clip: 0.5", "secure_aggregation.clip", "must be positive"),
    ("protocol: secagg+", "secure_aggregation.protocol", "one of 'secagg+', 'secagg'"),
    ("dropout: 0.01", "secure_aggregation", "a + 2d <= 0.9"),
    ("threshold: auto", "secure_aggregation", "2t > k + 1"),
])
def test_unsafe_or_wrong_secure_aggregation_settings_name_the_field_and_the_bound(
    edit: str, field: str, words: str
) -> None:
    bad = {"clip: 0.5": "clip: -1", "protocol: secagg+": "protocol: magic",
           "dropout: 0.01": "dropout: 0.45", "threshold: auto": "threshold: 0.5"}[edit]
    with pytest.raises(TaskSpecError) as info:
        parse_task_yaml(SECURE.replace(edit, bad), source="t.yaml")
    assert info.value.field == field
    assert words in str(info.value) and "t.yaml" in str(info.value)


def test_robustness_bounds_have_defaults_that_every_example_keeps() -> None:
    spec = parse_task_yaml(GOOD, source="t.yaml")
    assert spec.robustness.weight_cap == 1024
    assert spec.robustness.max_update_l2_norm == 1000.0
    assert spec.robustness.max_abs_parameter == 1e6
    root = Path(__file__).resolve().parents[3] / "examples"
    for path in sorted(root.glob("*.yaml")):
        assert load_task_file(path).robustness == spec.robustness, path.name
    tuned = parse_task_yaml(GOOD + "robustness: {weight_cap: 100, max_update_l2_norm: 5.0}\n")
    assert (tuned.robustness.weight_cap, tuned.robustness.max_update_l2_norm) == (100, 5.0)
    assert spec_from_dict(spec_to_dict(tuned)) == tuned


@pytest.mark.parametrize(("edit", "field", "words"), [
    ("robustness: {weight_cap: 0}", "robustness.weight_cap", "between 1 and 2147483648"),
    ("robustness: {max_update_l2_norm: 0}", "robustness.max_update_l2_norm", "(0, 1e+30]"),
    ("robustness: {max_update_l2_norm: .inf}", "robustness.max_update_l2_norm", "finite"),
    ("robustness: {max_abs_parameter: -1.0}", "robustness.max_abs_parameter", "(0, 1e+30]"),
    ("robustness: {max_norm: 3}", "robustness.max_norm", "unknown field"),
])
def test_bad_robustness_bounds_name_the_field(edit: str, field: str, words: str) -> None:
    with pytest.raises(TaskSpecError) as info:
        parse_task_yaml(GOOD + edit + "\n", source="t.yaml")
    assert info.value.field == field and words in str(info.value)


def test_a_norm_bound_below_the_central_dp_clip_is_refused() -> None:
    dp = GOOD.replace("clients_per_round: 4", "clients_per_round: 4\nover_selection: 1.0") + """\
privacy: {mode: central, noise_multiplier: 1.0, delta: 1.0e-5, clip: 2.0, population: 10,
          max_epsilon: 50.0}
robustness: {max_update_l2_norm: 1.5}
"""
    with pytest.raises(TaskSpecError) as info:
        parse_task_yaml(dp, source="t.yaml")
    assert info.value.field == "robustness.max_update_l2_norm"
    assert "below privacy.clip (2)" in str(info.value)
    assert parse_task_yaml(dp.replace("1.5}", "2.0}")).robustness.max_update_l2_norm == 2.0
