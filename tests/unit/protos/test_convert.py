"""protos/convert.py: task specs and tensor descriptions survive the wire."""

from __future__ import annotations

import pytest

from core.tensors import TensorInfo
from core.types import (
    Aggregation,
    DataSchema,
    Evaluation,
    LocalOptimizerKind,
    LocalTraining,
    ModelSpec,
    RobustAggregation,
    RobustKind,
    Robustness,
    ServerOptimizer,
    ServerOptimizerKind,
    TaskSpec,
)
from protos import convert
from protos.fedcoord.v1 import common_pb2


def full_spec() -> TaskSpec:
    return TaskSpec(
        name="n", model=ModelSpec("mlp", {"input_dim": 64, "hidden": [8, 4], "num_classes": 10}),
        rounds=3, clients_per_round=5, min_reports=2, over_selection=1.5,
        local=LocalTraining(epochs=2, batch_size=4, optimizer=LocalOptimizerKind.ADAM,
                            learning_rate=0.01),
        server=ServerOptimizer(kind=ServerOptimizerKind.FEDYOGI, learning_rate=0.1),
        evaluation=Evaluation(fraction=0.5, server_data="digits:split=test"),
        max_update_bytes=123456, seed=9,
        robustness=Robustness(weight_cap=77, max_update_l2_norm=12.5, max_abs_parameter=1e4),
        data_schema=DataSchema((64,), 10),
        aggregation=Aggregation(buffer=7, max_concurrency=9,
                                robust=RobustAggregation(RobustKind.TRIMMED_MEAN, 0.2)),
    )


def test_a_task_spec_round_trips_through_protobuf() -> None:
    spec = full_spec()
    wire = common_pb2.TaskSpec.FromString(convert.task_spec_to_proto(spec).SerializeToString())
    assert convert.task_spec_from_proto(wire) == spec


def test_a_spec_without_robustness_on_the_wire_gets_the_defaults() -> None:
    msg = convert.task_spec_to_proto(full_spec())
    msg.ClearField("robustness")
    assert convert.task_spec_from_proto(msg).robustness == Robustness()


def test_a_spec_without_a_declared_data_schema_stays_undeclared() -> None:
    msg = convert.task_spec_to_proto(full_spec())
    msg.ClearField("data_schema")
    assert convert.task_spec_from_proto(msg).data_schema is None


def test_the_simulation_section_stays_home() -> None:
    spec = TaskSpec(name="n", model=ModelSpec("mlp", {}), rounds=1, clients_per_round=1,
                    min_reports=1, simulation={"population": {"devices": 3}})
    assert convert.task_spec_from_proto(convert.task_spec_to_proto(spec)).simulation == {}


def test_an_invalid_spec_on_the_wire_names_the_field() -> None:
    msg = convert.task_spec_to_proto(full_spec())
    msg.min_reports = 99
    with pytest.raises(convert.WireFormatError, match=r"^spec.min_reports: must be between"):
        convert.task_spec_from_proto(msg)
    msg = convert.task_spec_to_proto(full_spec())
    msg.model.arguments_json = "{not json"
    with pytest.raises(convert.WireFormatError, match="arguments_json: not valid JSON"):
        convert.task_spec_from_proto(msg)
    msg = convert.task_spec_to_proto(full_spec())
    msg.robustness.weight_cap = 0
    with pytest.raises(convert.WireFormatError, match=r"^spec.robustness.weight_cap: must be"):
        convert.task_spec_from_proto(msg)
    msg = convert.task_spec_to_proto(full_spec())
    msg.data_schema.num_classes = 0
    with pytest.raises(convert.WireFormatError, match=r"^spec.data_schema.num_classes: must be"):
        convert.task_spec_from_proto(msg)


def test_tensor_infos_round_trip_and_unknown_dtypes_are_refused() -> None:
    infos = [TensorInfo("a", "float32", (2, 3)), TensorInfo("b", "int64", ())]
    assert convert.tensor_infos_from_proto(convert.tensor_infos_to_proto(infos)) == infos
    with pytest.raises(convert.WireFormatError, match="unknown dtype"):
        convert.tensor_info_from_proto(common_pb2.TensorSpec(name="x", dtype=77))


def test_a_hostile_secagg_plan_is_refused_before_any_big_number_is_built() -> None:
    """Found by fuzzing: value_bits near 2^31 made the device compute 2**value_bits for 30 s
    and half a GiB before the plan was checked."""
    import time

    from protos import convert as c
    from protos.fedcoord.v1 import device_pb2 as d

    plan = d.SecAggPlan(num_devices=5, neighbours=4, threshold=3, value_bits=1342177279,
                        ring_bits=32, clip=0.5, weight_cap=100, context=b"ctx",
                        phase_timeout_ms=1000)
    started = time.monotonic()
    with pytest.raises(c.WireFormatError, match="value_bits must be between 1 and"):
        c.secagg_plan_from_proto(plan)
    assert time.monotonic() - started < 0.1


def test_a_secagg_phase_timeout_survives_the_wire_to_the_millisecond() -> None:
    """Found by fuzzing: 8.072 s went out as 8071 ms (truncation)."""
    from protos import convert as c
    from protos.fedcoord.v1 import device_pb2 as d

    msg = d.SecAggPlan(num_devices=5, neighbours=4, threshold=3, value_bits=20, ring_bits=32,
                       clip=0.5, weight_cap=100, context=b"ctx", phase_timeout_ms=8072)
    assert c.secagg_plan_to_proto(c.secagg_plan_from_proto(msg)).phase_timeout_ms == 8072
