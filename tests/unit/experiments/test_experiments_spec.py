"""The experiment spec: a valid dict parses with its defaults; every bad field is named."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from core.experiments.assignment import StratifiedSplit, TrafficSplit
from core.experiments.errors import ExperimentError, ExperimentSpecError
from core.experiments.spec import Direction, Guardrail, parse_experiment_spec

VALID: dict[str, Any] = {
    "arms": [{"name": "control", "weight": 0.5}, {"name": "new_model", "weight": 0.5}],
    "primary_metric": {"name": "accuracy", "direction": "increase"},
    "mde": 0.01,
    "alpha": 0.05,
    "horizon_rounds": 20,
    "salt": "3f9c0d2a",
}


def with_(path: str, value: Any) -> dict[str, Any]:
    """VALID with the value at dotted ``path`` (``arms.1.weight``) replaced; a value of
    ``...`` deletes the key."""
    raw = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if value is ...:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


def test_a_minimal_spec_parses_with_its_defaults() -> None:
    spec = parse_experiment_spec(VALID)
    assert spec.arm_names == ("control", "new_model")
    assert spec.control == "control" and spec.treatments == ("new_model",)
    assert spec.primary.direction is Direction.INCREASE and spec.primary.covariate is None
    assert spec.guardrails == ()
    assert spec.tau == spec.mde == 0.01
    assert spec.srm_threshold == 0.001
    assert spec.comparison_alpha == 0.05
    assert spec.split() == TrafficSplit([0.5, 0.5])


def test_a_full_spec_parses() -> None:
    raw = {
        **VALID,
        "arms": [
            {"name": "a", "weight": 0.2},
            {"name": "b", "weight": 0.3},
            {"name": "c", "weight": 0.5},
        ],
        "control": "c",
        "primary_metric": {"name": "loss", "direction": "decrease", "covariate": "loss_pre"},
        "guardrails": [
            {"metric": "latency_ms", "max_increase": 5},
            {"metric": "retention", "max_decrease": 0.0},
        ],
        "tau": 0.02,
        "srm_threshold": 0.0001,
        "strata": {"low_end": {"c": 0.9, "a": 0.1}},
    }
    spec = parse_experiment_spec(raw)
    assert spec.treatments == ("a", "b")
    assert spec.comparison_alpha == pytest.approx(0.025)  # Bonferroni over two treatments
    assert spec.primary.covariate == "loss_pre"
    assert spec.guardrails == (
        Guardrail("latency_ms", Direction.INCREASE, 5.0),
        Guardrail("retention", Direction.DECREASE, 0.0),
    )
    assert spec.strata == {"low_end": (0.1, 0.0, 0.9)}
    split = spec.split()
    assert isinstance(split, StratifiedSplit)
    assert split.split_for("low_end").weights == (0.1, 0.0, 0.9)
    assert split.split_for(None).weights == (0.2, 0.3, 0.5)


@pytest.mark.parametrize(
    ("path", "value", "field", "words"),
    [
        ("arms", ..., "arms", "is required"),
        ("arms", [{"name": "only", "weight": 1.0}], "arms", "at least two"),
        ("arms.1.weight", 0.6, "arms", "sum to 1"),
        ("arms.1.weight", -0.5, "arms[1].weight", "> 0"),
        ("arms.1.weight", "half", "arms[1].weight", "finite number"),
        ("arms.1.weight", True, "arms[1].weight", "finite number"),
        ("arms.1.name", "control", "arms[1].name", "named twice"),
        ("arms.1.name", "", "arms[1].name", "non-empty"),
        ("arms.1.model", 3, "arms[1].model", "unknown key"),
        ("arms.0", "control", "arms[0]", "mapping"),
        ("control", "nobody", "control", "not an arm"),
        ("primary_metric", ..., "primary_metric", "is required"),
        ("primary_metric.direction", "up", "primary_metric.direction", "increase, decrease"),
        ("primary_metric.name", 7, "primary_metric.name", "metric name"),
        ("guardrails", {"metric": "loss"}, "guardrails", "list"),
        ("guardrails", [{"metric": "loss"}], "guardrails[0]", "exactly one"),
        (
            "guardrails",
            [{"metric": "loss", "max_increase": -1}],
            "guardrails[0].max_increase",
            ">= 0",
        ),
        (
            "guardrails",
            [{"metric": "loss", "max_increase": 1, "max_decrease": 1}],
            "guardrails[0]",
            "exactly one",
        ),
        ("mde", 0, "mde", "> 0"),
        ("mde", float("nan"), "mde", "finite"),
        ("alpha", 0.5, "alpha", "(0, 0.5)"),
        ("alpha", ..., "alpha", "is required"),
        ("horizon_rounds", 2.5, "horizon_rounds", "integer >= 1"),
        ("horizon_rounds", 0, "horizon_rounds", "integer >= 1"),
        ("salt", "", "salt", "non-empty string"),
        ("salt", 1234, "salt", "non-empty string"),
        ("tau", -1.0, "tau", "> 0"),
        ("srm_threshold", 2, "srm_threshold", "(0, 1)"),
        ("strata", {"low_end": {"control": 0.5}}, "strata.low_end", "sum to 1"),
        ("strata", {"low_end": {"ghost": 1.0}}, "strata.low_end.ghost", "unknown key"),
        (
            "strata",
            {"low_end": {"control": 1.5, "new_model": -0.5}},
            "strata.low_end.new_model",
            ">= 0",
        ),
        ("horizon", 20, "horizon", "unknown key"),
    ],
)
def test_a_bad_field_is_named_in_the_error(path: str, value: Any, field: str, words: str) -> None:
    with pytest.raises(ExperimentSpecError) as caught:
        parse_experiment_spec(with_(path, value))
    error = caught.value
    assert error.field == field
    assert str(error).startswith(f"field '{field}': ")
    assert words in str(error)
    assert isinstance(error, ValueError) and isinstance(error, ExperimentError)


def test_the_caller_adds_the_file_name() -> None:
    with pytest.raises(ExperimentSpecError) as caught:
        parse_experiment_spec(with_("mde", -1))
    located = caught.value.with_source("experiments/ranker.yaml")
    assert str(located) == "experiments/ranker.yaml: field 'mde': must be > 0, got -1.0"
    assert located.field == "mde"


def test_a_spec_that_is_not_a_mapping_is_refused_at_top_level() -> None:
    with pytest.raises(ExperimentSpecError, match="top level: an experiment must be a mapping"):
        parse_experiment_spec(["arms"])
