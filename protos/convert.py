"""The one place that turns protobuf messages into core types and back.

Conversions from wire messages raise :class:`WireFormatError` (a ValueError) with a message
naming the field, which transports map to INVALID_ARGUMENT.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from core.taskspec import TaskSpecError, spec_from_dict, spec_to_dict
from core.tensors import TensorInfo
from core.types import DeviceAttributes, LocalOptimizerKind, LocalTraining, ModelSpec, TaskSpec
from protos.fedcoord.v1 import common_pb2

_DTYPES: dict[str, int] = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "float64": common_pb2.DTYPE_FLOAT64,
    "float16": common_pb2.DTYPE_FLOAT16,
    "int32": common_pb2.DTYPE_INT32,
    "int64": common_pb2.DTYPE_INT64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class WireFormatError(ValueError):
    """A message is well-formed protobuf but its content is not acceptable."""


def tensor_info_to_proto(info: TensorInfo) -> common_pb2.TensorSpec:
    return common_pb2.TensorSpec(name=info.name, dtype=_DTYPES[info.dtype], shape=list(info.shape))


def tensor_infos_to_proto(infos: Iterable[TensorInfo]) -> list[common_pb2.TensorSpec]:
    return [tensor_info_to_proto(i) for i in infos]


def tensor_info_from_proto(msg: common_pb2.TensorSpec) -> TensorInfo:
    dtype = _DTYPE_NAMES.get(msg.dtype)
    if dtype is None:
        raise WireFormatError(f"tensor '{msg.name}': unknown dtype enum value {msg.dtype}")
    return TensorInfo(name=msg.name, dtype=dtype, shape=tuple(int(d) for d in msg.shape))


def tensor_infos_from_proto(msgs: Sequence[common_pb2.TensorSpec]) -> list[TensorInfo]:
    return [tensor_info_from_proto(m) for m in msgs]


def attributes_from_proto(msg: common_pb2.DeviceAttributes) -> DeviceAttributes:
    return DeviceAttributes(
        charging=msg.charging,
        unmetered=msg.unmetered,
        idle=msg.idle,
        population=msg.population or "default",
    )


def attributes_to_proto(attrs: DeviceAttributes) -> common_pb2.DeviceAttributes:
    return common_pb2.DeviceAttributes(
        charging=attrs.charging,
        unmetered=attrs.unmetered,
        idle=attrs.idle,
        population=attrs.population,
    )


def task_spec_to_proto(spec: TaskSpec) -> common_pb2.TaskSpec:
    d = spec_to_dict(spec)
    return common_pb2.TaskSpec(
        name=d["name"],
        model=common_pb2.ModelSpec(
            architecture=d["model"]["architecture"],
            arguments_json=json.dumps(d["model"]["arguments"], sort_keys=True),
        ),
        rounds=d["rounds"],
        clients_per_round=d["clients_per_round"],
        min_reports=d["min_reports"],
        population=d["population"],
        eligibility=common_pb2.Eligibility(**d["eligibility"]),
        over_selection=d["over_selection"],
        round_deadline_s=d["round_deadline_s"],
        selection_window_s=d["selection_window_s"],
        local=common_pb2.LocalTraining(**d["local"]),
        server=common_pb2.ServerOptimizer(**d["server"]),
        evaluation=common_pb2.Evaluation(**d["evaluation"]),
        max_update_bytes=d["max_update_bytes"],
        seed=d["seed"],
    )


def task_spec_from_proto(msg: common_pb2.TaskSpec) -> TaskSpec:
    """Raises WireFormatError naming the field when the spec is invalid."""
    try:
        arguments = json.loads(msg.model.arguments_json or "{}")
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"spec.model.arguments_json: not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise WireFormatError("spec.model.arguments_json: expected a JSON object")
    local = msg.local
    server = msg.server
    data = {
        "name": msg.name,
        "model": {"architecture": msg.model.architecture, "arguments": arguments},
        "rounds": msg.rounds,
        "clients_per_round": msg.clients_per_round,
        "min_reports": msg.min_reports,
        "population": msg.population or "default",
        "eligibility": {
            "require_charging": msg.eligibility.require_charging,
            "require_unmetered": msg.eligibility.require_unmetered,
            "require_idle": msg.eligibility.require_idle,
        },
        "over_selection": msg.over_selection,
        "round_deadline_s": msg.round_deadline_s,
        "selection_window_s": msg.selection_window_s,
        "local": {
            "epochs": local.epochs,
            "batch_size": local.batch_size,
            "optimizer": local.optimizer or "sgd",
            "learning_rate": local.learning_rate,
            "momentum": local.momentum,
        },
        "server": {
            "kind": server.kind or "fedavg",
            "learning_rate": server.learning_rate,
            "momentum": server.momentum,
            "beta1": server.beta1,
            "beta2": server.beta2,
            "epsilon": server.epsilon,
        },
        "evaluation": {
            "fraction": msg.evaluation.fraction,
            "server_data": msg.evaluation.server_data,
        },
        "max_update_bytes": msg.max_update_bytes,
        "seed": msg.seed,
    }
    try:
        return spec_from_dict(data, source="spec")
    except TaskSpecError as exc:
        raise WireFormatError(f"spec.{exc.field}: {exc.message}") from None


def task_spec_to_proto_parts(
    model: ModelSpec, local: LocalTraining
) -> tuple[common_pb2.ModelSpec, common_pb2.LocalTraining]:
    """The model and local-training parts of a plan."""
    return (
        common_pb2.ModelSpec(
            architecture=model.architecture,
            arguments_json=json.dumps(dict(model.arguments), sort_keys=True),
        ),
        common_pb2.LocalTraining(
            epochs=local.epochs,
            batch_size=local.batch_size,
            optimizer=local.optimizer.value,
            learning_rate=local.learning_rate,
            momentum=local.momentum,
        ),
    )


def plan_parts_from_proto(
    model: common_pb2.ModelSpec, local: common_pb2.LocalTraining
) -> tuple[ModelSpec, LocalTraining]:
    try:
        arguments = json.loads(model.arguments_json or "{}")
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"model.arguments_json: not valid JSON ({exc.msg})") from None
    try:
        optimizer = LocalOptimizerKind(local.optimizer or "sgd")
    except ValueError:
        raise WireFormatError(f"local.optimizer: unknown optimizer {local.optimizer!r}") from None
    return (
        ModelSpec(architecture=model.architecture, arguments=arguments),
        LocalTraining(
            epochs=local.epochs,
            batch_size=local.batch_size,
            optimizer=optimizer,
            learning_rate=local.learning_rate,
            momentum=local.momentum,
        ),
    )
