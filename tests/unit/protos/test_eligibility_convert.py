"""protos/convert.py: a task's eligibility, its experiment-arm filter included, survives the
wire; a spec without a filter (or from an older client) admits every arm; a bad filter on
the wire is refused naming the field."""

from __future__ import annotations

import pytest

from core.types import ArmFilter, Eligibility, ModelSpec, TaskSpec
from protos import convert
from protos.fedcoord.v1 import common_pb2


def spec(eligibility: Eligibility) -> TaskSpec:
    return TaskSpec(name="arm", model=ModelSpec("logistic_regression",
                                                {"input_dim": 4, "num_classes": 3}),
                    rounds=2, clients_per_round=4, min_reports=2, eligibility=eligibility)


def test_an_arm_filter_round_trips_with_the_other_requirements() -> None:
    original = spec(Eligibility(require_charging=True, require_idle=True,
                                arm=ArmFilter("3f9c-salt", (0.2, 0.5, 0.3), 2)))
    msg = convert.task_spec_to_proto(original)
    assert msg.eligibility.arm.salt == "3f9c-salt"
    assert list(msg.eligibility.arm.weights) == [0.2, 0.5, 0.3]
    assert msg.eligibility.arm.index == 2
    wire = common_pb2.TaskSpec.FromString(msg.SerializeToString())
    assert convert.task_spec_from_proto(wire) == original


def test_without_a_filter_nothing_is_sent_and_every_arm_is_admitted() -> None:
    original = spec(Eligibility(require_unmetered=True))
    msg = convert.task_spec_to_proto(original)
    assert not msg.eligibility.HasField("arm")
    assert convert.task_spec_from_proto(msg) == original
    older = common_pb2.TaskSpec()  # a client that predates the field: never sets it
    older.CopyFrom(msg)
    older.eligibility.ClearField("arm")
    assert convert.task_spec_from_proto(older).eligibility.arm is None


@pytest.mark.parametrize(("change", "field"), [
    (lambda arm: arm.ClearField("salt"), "spec.eligibility.arm.salt"),
    (lambda arm: arm.weights.append(0.5), "spec.eligibility.arm.weights"),
    (lambda arm: setattr(arm, "index", 7), "spec.eligibility.arm.index"),
])
def test_a_bad_filter_on_the_wire_is_refused_naming_the_field(change: object,
                                                              field: str) -> None:
    msg = convert.task_spec_to_proto(spec(Eligibility(arm=ArmFilter("s", (0.5, 0.5), 0))))
    assert callable(change)
    change(msg.eligibility.arm)
    with pytest.raises(convert.WireFormatError, match=f"^{field}: "):
        convert.task_spec_from_proto(msg)
