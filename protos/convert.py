"""The one place that turns protobuf messages into core types and back.

Conversions from wire messages raise :class:`WireFormatError` (a ValueError) with a message
naming the field, which transports map to INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from core.privacy.spec import LocalDp
from core.privacy.task import PrivacyStatus
from core.protocol import (
    MetricsPolicy,
    Participation,
    PlanPrivacy,
    SecAggPlan,
    ShardUpload,
    UpdateHeader,
)
from core.secagg import messages as sa
from core.secagg.params import SecAggParams
from core.security.identity import DeviceProof
from core.shards import PartialSum, RoundKey, ShardMode, SignedTicket
from core.taskspec import TaskSpecError, spec_from_dict, spec_to_dict
from core.tensors import TensorInfo
from core.types import (
    DataSchema,
    DeviceAttributes,
    LocalOptimizerKind,
    LocalTraining,
    ModelSpec,
    TaskKind,
    TaskSpec,
)
from protos.fedcoord.v1 import admin_pb2, aggregator_pb2, common_pb2, device_pb2

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
        raise WireFormatError(f"tensor {msg.name[:40]!r}: unknown dtype enum value {msg.dtype}")
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


#: Bounds of a reported data schema (those of a task's ``data_schema``, core.taskspec).
MAX_SCHEMA_DIMENSIONS = 8
MAX_SCHEMA_SIZE = 1 << 20
#: Most task ids a check-in may name as declined, and the longest id.
MAX_DECLINED_TASKS = 32
MAX_TASK_ID_CHARS = 128


def data_schema_to_proto(schema: DataSchema) -> common_pb2.DataSchema:
    return common_pb2.DataSchema(feature_shape=list(schema.feature_shape),
                                 num_classes=schema.num_classes)


def data_schema_from_proto(msg: common_pb2.DataSchema) -> DataSchema:
    """Raises WireFormatError when the schema has no dimension, more than 8, or a dimension
    or class count outside [1, 2^20]."""
    shape = tuple(int(d) for d in msg.feature_shape[:MAX_SCHEMA_DIMENSIONS + 1])
    if not 1 <= len(shape) <= MAX_SCHEMA_DIMENSIONS or not all(
            1 <= d <= MAX_SCHEMA_SIZE for d in shape):
        shown = list(shape) if len(shape) <= MAX_SCHEMA_DIMENSIONS else "more than 8 dimensions"
        raise WireFormatError(f"data_schema.feature_shape must list 1 to "
                              f"{MAX_SCHEMA_DIMENSIONS} dimensions, each between 1 and "
                              f"{MAX_SCHEMA_SIZE}, got {shown}")
    if not 1 <= msg.num_classes <= MAX_SCHEMA_SIZE:
        raise WireFormatError(f"data_schema.num_classes must be between 1 and "
                              f"{MAX_SCHEMA_SIZE}, got {msg.num_classes}")
    return DataSchema(shape, int(msg.num_classes))


def check_in_schema_from_proto(msg: device_pb2.CheckInRequest) -> DataSchema | None:
    """The check-in's data schema; None when the agent sent none (an older agent)."""
    return data_schema_from_proto(msg.data_schema) if msg.HasField("data_schema") else None


def check_in_stratum_from_proto(msg: device_pb2.CheckInRequest) -> str | None:
    """The stratum the device declared (None: none, an older agent's ""); the coordinator
    checks the name (:func:`core.experiments.assignment.stratum_problem`)."""
    return msg.stratum or None


def declined_task_ids_from_proto(ids: Sequence[str]) -> frozenset[str]:
    """Raises WireFormatError for more than 32 ids or one longer than 128 characters."""
    if len(ids) > MAX_DECLINED_TASKS:
        raise WireFormatError(f"declined_task_ids: at most {MAX_DECLINED_TASKS}, got {len(ids)}")
    if any(len(i) > MAX_TASK_ID_CHARS for i in ids):
        raise WireFormatError(f"declined_task_ids: a task id is at most {MAX_TASK_ID_CHARS} "
                              "characters")
    return frozenset(ids)


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
        eligibility=_eligibility_to_proto(d["eligibility"]),
        over_selection=d["over_selection"],
        round_deadline_s=d["round_deadline_s"],
        selection_window_s=d["selection_window_s"],
        local=common_pb2.LocalTraining(**d["local"]),
        server=common_pb2.ServerOptimizer(**d["server"]),
        evaluation=common_pb2.Evaluation(**d["evaluation"]),
        max_update_bytes=d["max_update_bytes"],
        seed=d["seed"],
        secure_aggregation=_secure_aggregation_to_proto(d["secure_aggregation"]),
        privacy_json=("" if d["privacy"] is None
                      else json.dumps(d["privacy"], sort_keys=True)),
        robustness=common_pb2.Robustness(**d["robustness"]),
        data_schema=(None if d["data_schema"] is None
                     else common_pb2.DataSchema(**d["data_schema"])),
        aggregation_json=json.dumps(d["aggregation"], sort_keys=True),
        kind=d["kind"],
        evaluate_json=("" if spec.kind is TaskKind.TRAIN
                       else json.dumps(d["evaluate"], sort_keys=True)),
    )


def _eligibility_to_proto(d: dict[str, Any]) -> common_pb2.Eligibility:
    arm = d["arm"]
    return common_pb2.Eligibility(
        require_charging=d["require_charging"], require_unmetered=d["require_unmetered"],
        require_idle=d["require_idle"],
        arm=(None if arm is None else common_pb2.ArmFilter(
            salt=arm["salt"], weights=arm["weights"], index=arm["index"])),
    )


def _eligibility_from_proto(msg: common_pb2.Eligibility) -> dict[str, Any]:
    """An absent ``arm`` (an older client, or no filter) is None: any arm's devices."""
    out: dict[str, Any] = {
        "require_charging": msg.require_charging,
        "require_unmetered": msg.require_unmetered,
        "require_idle": msg.require_idle,
    }
    if msg.HasField("arm"):
        out["arm"] = {"salt": msg.arm.salt, "weights": list(msg.arm.weights),
                      "index": msg.arm.index}
    return out


def _secure_aggregation_to_proto(d: dict[str, Any] | None) -> common_pb2.SecureAggregation | None:
    if d is None:
        return None
    return common_pb2.SecureAggregation(
        protocol=d["protocol"], neighbours=d["neighbours"] or 0, threshold=d["threshold"] or 0.0,
        clip=d["clip"], bits=d["bits"] or 0, dropout=d["dropout"],
        corrupt_fraction=d["corrupt_fraction"], adversary=d["adversary"],
        weight_cap=d["weight_cap"], phase_timeout_s=d["phase_timeout_s"],
    )


def _secure_aggregation_from_proto(msg: common_pb2.TaskSpec) -> dict[str, Any] | None:
    if not msg.HasField("secure_aggregation"):
        return None
    sa = msg.secure_aggregation
    return {
        "protocol": sa.protocol or "secagg+", "neighbours": sa.neighbours or None,
        "threshold": sa.threshold or None, "clip": sa.clip, "bits": sa.bits or None,
        "dropout": sa.dropout, "corrupt_fraction": sa.corrupt_fraction,
        "adversary": sa.adversary or "semi-malicious", "weight_cap": sa.weight_cap,
        "phase_timeout_s": sa.phase_timeout_s,
    }


def task_spec_from_proto(msg: common_pb2.TaskSpec) -> TaskSpec:
    """Raises WireFormatError naming the field when the spec is invalid."""
    try:
        arguments = json.loads(msg.model.arguments_json or "{}")
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"spec.model.arguments_json: not valid JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise WireFormatError("spec.model.arguments_json: expected a JSON object")
    privacy = None
    if msg.privacy_json:
        try:
            privacy = json.loads(msg.privacy_json)
        except json.JSONDecodeError as exc:
            raise WireFormatError(f"spec.privacy_json: not valid JSON ({exc.msg})") from None
    local = msg.local
    server = msg.server
    data = {
        "name": msg.name,
        "model": {"architecture": msg.model.architecture, "arguments": arguments},
        "rounds": msg.rounds,
        "clients_per_round": msg.clients_per_round,
        "min_reports": msg.min_reports,
        "population": msg.population or "default",
        "eligibility": _eligibility_from_proto(msg.eligibility),
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
        "secure_aggregation": _secure_aggregation_from_proto(msg),
        "privacy": privacy,
    }
    if msg.HasField("robustness"):  # absent (an older client): the defaults
        r = msg.robustness
        data["robustness"] = {"weight_cap": r.weight_cap,
                              "max_update_l2_norm": r.max_update_l2_norm,
                              "max_abs_parameter": r.max_abs_parameter}
    if msg.aggregation_json:
        try:
            data["aggregation"] = json.loads(msg.aggregation_json)
        except json.JSONDecodeError as exc:
            raise WireFormatError(f"spec.aggregation_json: not valid JSON ({exc.msg})") from None
    if msg.kind:
        data["kind"] = msg.kind
    if msg.evaluate_json:
        try:
            data["evaluate"] = json.loads(msg.evaluate_json)
        except json.JSONDecodeError as exc:
            raise WireFormatError(f"spec.evaluate_json: not valid JSON ({exc.msg})") from None
    if msg.HasField("data_schema"):
        data["data_schema"] = {"feature_shape": list(msg.data_schema.feature_shape),
                               "num_classes": msg.data_schema.num_classes}
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


# ---------------------------------------------------------------- aggregator shards


def ticket_to_proto(ticket: SignedTicket | None) -> device_pb2.UploadTicket | None:
    return None if ticket is None else device_pb2.UploadTicket(body=ticket.body, mac=ticket.mac)


def ticket_from_proto(msg: device_pb2.UploadTicket) -> SignedTicket | None:
    """None for an absent (empty) ticket."""
    if not msg.body and not msg.mac:
        return None
    return SignedTicket(bytes(msg.body), bytes(msg.mac))


def shard_upload_to_proto(upload: ShardUpload | None) -> device_pb2.ShardUpload | None:
    if upload is None:
        return None
    return device_pb2.ShardUpload(address=upload.address,
                                  ticket=ticket_to_proto(upload.ticket))


def shard_upload_from_proto(msg: device_pb2.GetPlanResponse) -> ShardUpload | None:
    if not msg.HasField("shard_upload"):
        return None
    ticket = ticket_from_proto(msg.shard_upload.ticket)
    if not msg.shard_upload.address or ticket is None:
        raise WireFormatError("shard_upload: needs an address and a ticket")
    return ShardUpload(msg.shard_upload.address, ticket)


def round_key_to_proto(key: RoundKey) -> aggregator_pb2.ShardRoundKey:
    return aggregator_pb2.ShardRoundKey(task_id=key.task_id, round_id=key.round_id)


def round_key_from_proto(msg: aggregator_pb2.ShardRoundKey) -> RoundKey:
    return RoundKey(msg.task_id, msg.round_id)


def partial_sum_header_to_proto(key: RoundKey, part: PartialSum) -> aggregator_pb2.PartialSumHeader:
    """The header of a partial sum; the float64 sum's bytes follow it as chunks."""
    return aggregator_pb2.PartialSumHeader(
        round=round_key_to_proto(key), mode=part.mode.value, reported=part.reported,
        weight=part.weight, unclipped=part.unclipped, metric_sums=part.metric_sums,
        metric_weights=part.metric_weights, values=part.total.size,
        sha256=hashlib.sha256(part.total.astype("<f8", copy=False).tobytes()).hexdigest())


def partial_sum_from_proto(header: aggregator_pb2.PartialSumHeader,
                           data: bytes | bytearray) -> PartialSum:
    """A partial sum from its header and the concatenated chunks.

    Raises:
        WireFormatError: an unknown mode, or chunks that disagree with the header.
    """
    try:
        mode = ShardMode(header.mode)
    except ValueError:
        raise WireFormatError(f"partial sum: unknown mode {header.mode!r}") from None
    if len(data) != 8 * header.values:
        raise WireFormatError(f"partial sum: {len(data)} bytes for {header.values} float64 "
                              "values")
    if hashlib.sha256(data).hexdigest() != header.sha256:
        raise WireFormatError("partial sum: the chunks' sha256 does not match the header's")
    total = np.frombuffer(data, dtype="<f8")  # no copy: the float64 sum is the buffer
    return PartialSum(mode, total, list(header.reported), weight=header.weight,
                      unclipped=header.unclipped, metric_sums=dict(header.metric_sums),
                      metric_weights=dict(header.metric_weights))


def update_header_from_proto(msg: device_pb2.UpdateHeader) -> UpdateHeader:
    """An upload's header, as an aggregator shard's UploadUpdate receives it (the ticket
    None when absent)."""
    p = msg.participation
    return UpdateHeader(
        participation=Participation(p.device_id, p.task_id, p.round_number, p.token),
        num_examples=msg.num_examples, tensors=tensor_infos_from_proto(msg.tensors),
        total_bytes=msg.total_bytes, sha256=msg.sha256, metrics=dict(msg.metrics),
        upload_id=msg.upload_id, ticket=ticket_from_proto(msg.ticket))


# ---------------------------------------------------------------- differential privacy


_METRICS_POLICIES = {
    MetricsPolicy.CLEAR: device_pb2.METRICS_CLEAR,
    MetricsPolicy.MASKED: device_pb2.METRICS_MASKED,
    MetricsPolicy.WITHHELD: device_pb2.METRICS_WITHHELD,
}


def metrics_policy_to_proto(policy: MetricsPolicy) -> device_pb2.MetricsPolicy:
    return _METRICS_POLICIES[policy]


def metrics_policy_from_proto(value: int) -> MetricsPolicy:
    """Unspecified or unknown values read as WITHHELD: a device never sends metrics it was
    not told it may."""
    for policy, number in _METRICS_POLICIES.items():
        if number == value:
            return policy
    return MetricsPolicy.WITHHELD


def privacy_status_to_proto(status: PrivacyStatus) -> admin_pb2.TaskPrivacy:
    draw = status.last_draw
    return admin_pb2.TaskPrivacy(
        epsilon=status.epsilon, delta=status.delta, budget=status.budget,
        sampling=status.sampling.value, rounds_accounted=status.rounds_accounted,
        last_sampling_rate=draw.sampling_rate if draw else 0.0,
        last_eligible=draw.eligible if draw else 0, last_cohort=draw.cohort if draw else 0,
        last_population=draw.population if draw else 0)


def plan_privacy_to_proto(privacy: PlanPrivacy | None) -> device_pb2.DevicePrivacy | None:
    if privacy is None:
        return None
    local = privacy.local
    return device_pb2.DevicePrivacy(
        l2_clip_norm=privacy.l2_clip_norm or 0.0, report_unclipped=privacy.report_unclipped,
        local_noise_multiplier=local.noise_multiplier if local else 0.0,
        local_max_grad_norm=local.max_grad_norm if local else 0.0,
        local_delta=local.delta if local else 0.0,
        local_max_epsilon=local.max_epsilon if local else 0.0,
        distributed_noise_steps=privacy.distributed_noise_steps or 0.0,
        devices_planned=privacy.devices_planned,
    )


def plan_privacy_from_proto(msg: device_pb2.GetPlanResponse) -> PlanPrivacy | None:
    if not msg.HasField("privacy"):
        return None
    p = msg.privacy
    if not (p.l2_clip_norm >= 0 and np.isfinite(p.l2_clip_norm)):
        raise WireFormatError(f"privacy.l2_clip_norm must be >= 0 and finite, got "
                              f"{p.l2_clip_norm}")
    local = None
    if p.local_delta:
        if not (0 < p.local_delta < 1 and p.local_noise_multiplier > 0
                and p.local_max_grad_norm > 0 and p.local_max_epsilon > 0):
            raise WireFormatError("privacy: local_noise_multiplier, local_max_grad_norm and "
                                  "local_max_epsilon must be positive and local_delta in (0, 1)")
        local = LocalDp(p.local_noise_multiplier, p.local_max_grad_norm, p.local_delta,
                        p.local_max_epsilon)
    if p.report_unclipped and not p.l2_clip_norm:
        raise WireFormatError("privacy.report_unclipped needs l2_clip_norm")
    if p.distributed_noise_steps and not (np.isfinite(p.distributed_noise_steps)
                                          and p.distributed_noise_steps > 0
                                          and p.devices_planned >= 1 and p.l2_clip_norm):
        raise WireFormatError("privacy: distributed_noise_steps needs a positive value, "
                              "devices_planned >= 1 and l2_clip_norm")
    return PlanPrivacy(l2_clip_norm=p.l2_clip_norm or None,
                       report_unclipped=p.report_unclipped, local=local,
                       distributed_noise_steps=p.distributed_noise_steps or None,
                       devices_planned=p.devices_planned)


# ---------------------------------------------------------------- secure aggregation


def secagg_plan_to_proto(plan: SecAggPlan) -> device_pb2.SecAggPlan:
    p = plan.params
    return device_pb2.SecAggPlan(
        num_devices=p.num_devices, neighbours=p.neighbours, threshold=p.threshold,
        value_bits=p.value_bits, ring_bits=p.ring_bits, clip=p.clip, weight_cap=p.weight_cap,
        context=plan.context, phase_timeout_ms=round(plan.phase_timeout_s * 1000),
    )


def secagg_plan_from_proto(msg: device_pb2.SecAggPlan) -> SecAggPlan:
    if msg.ring_bits not in (32, 64):
        raise WireFormatError(f"secure_aggregation.ring_bits must be 32 or 64, got {msg.ring_bits}")
    if not 2 <= msg.threshold <= msg.neighbours + 1 or msg.num_devices < 3:
        raise WireFormatError(f"secure_aggregation: threshold {msg.threshold} does not fit "
                              f"{msg.neighbours} neighbours of {msg.num_devices} devices")
    # value_bits is checked before 2**value_bits is computed: a hostile plan must not make
    # the device build a number of a billion bits (found by fuzzing).
    if not 1 <= msg.value_bits < msg.ring_bits:
        raise WireFormatError(f"secure_aggregation.value_bits must be between 1 and "
                              f"ring_bits - 1 ({msg.ring_bits - 1}), got {msg.value_bits}")
    if not (msg.clip > 0 and 1 <= msg.weight_cap < 2**msg.value_bits and msg.context
            and msg.phase_timeout_ms > 0):
        raise WireFormatError("secure_aggregation: clip, weight_cap, context and "
                              "phase_timeout_ms must be set and positive")
    params = SecAggParams(
        num_devices=msg.num_devices, neighbours=msg.neighbours, threshold=msg.threshold,
        value_bits=msg.value_bits, ring_bits=msg.ring_bits, clip=msg.clip,
        weight_cap=msg.weight_cap, security_failure=0.0, correctness_failure=0.0,
    )
    return SecAggPlan(params, bytes(msg.context), msg.phase_timeout_ms / 1000.0)


def share_keys_instruction_to_proto(m: sa.ShareKeysRequest) -> device_pb2.SecAggShareKeysInstruction:
    return device_pb2.SecAggShareKeysInstruction(index=m.index, peers=[
        device_pb2.SecAggPeer(index=p.index, encryption_public_key=p.encryption_public,
                              mask_public_key=p.mask_public, config_hash=p.config_hash)
        for p in m.peers
    ])


def share_keys_instruction_from_proto(msg: device_pb2.SecAggShareKeysInstruction
                                      ) -> sa.ShareKeysRequest:
    return sa.ShareKeysRequest(msg.index, tuple(
        sa.PeerKeys(p.index, bytes(p.encryption_public_key), bytes(p.mask_public_key),
                    bytes(p.config_hash))
        for p in msg.peers
    ))


def ciphertexts_to_proto(pairs: Iterable[tuple[int, bytes]]) -> list[device_pb2.SecAggCiphertext]:
    return [device_pb2.SecAggCiphertext(peer=v, ciphertext=c) for v, c in pairs]


def ciphertexts_from_proto(msgs: Iterable[device_pb2.SecAggCiphertext]
                           ) -> tuple[tuple[int, bytes], ...]:
    return tuple((m.peer, bytes(m.ciphertext)) for m in msgs)


def unmask_instruction_to_proto(m: sa.UnmaskRequest) -> device_pb2.SecAggUnmaskInstruction:
    return device_pb2.SecAggUnmaskInstruction(survivors=list(m.survivors), dropped=list(m.dropped))


def unmask_instruction_from_proto(msg: device_pb2.SecAggUnmaskInstruction) -> sa.UnmaskRequest:
    return sa.UnmaskRequest(tuple(msg.survivors), tuple(msg.dropped))


def shares_to_proto(pairs: Iterable[tuple[int, bytes]]) -> list[device_pb2.SecAggShare]:
    return [device_pb2.SecAggShare(owner=v, share=s) for v, s in pairs]


def shares_from_proto(msgs: Iterable[device_pb2.SecAggShare]) -> tuple[tuple[int, bytes], ...]:
    return tuple((m.owner, bytes(m.share)) for m in msgs)


def ring_vector_to_bytes(vector: sa.RingVector) -> bytes:
    return vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()


def ring_vector_from_bytes(data: bytes, ring_bits: int) -> sa.RingVector:
    width = ring_bits // 8
    if len(data) % width:
        raise WireFormatError(f"masked_input is {len(data)} bytes, not a whole number of "
                              f"{ring_bits}-bit values")
    dtype = np.uint32 if ring_bits == 32 else np.uint64
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


# -- device identity -------------------------------------------------------------------------


def device_proof_to_proto(proof: DeviceProof) -> device_pb2.DeviceProof:
    return device_pb2.DeviceProof(public_key=proof.public_key, timestamp_ms=proof.timestamp_ms,
                                  nonce=proof.nonce, signature=proof.signature)


def device_proof_from_proto(msg: device_pb2.DeviceProof) -> DeviceProof:
    """Sizes are checked by :meth:`DeviceProof.verify`, which says what is wrong."""
    return DeviceProof(public_key=bytes(msg.public_key), timestamp_ms=msg.timestamp_ms,
                       nonce=bytes(msg.nonce), signature=bytes(msg.signature))
