from protos.fedcoord.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricsPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRICS_UNSPECIFIED: _ClassVar[MetricsPolicy]
    METRICS_CLEAR: _ClassVar[MetricsPolicy]
    METRICS_MASKED: _ClassVar[MetricsPolicy]
    METRICS_WITHHELD: _ClassVar[MetricsPolicy]
METRICS_UNSPECIFIED: MetricsPolicy
METRICS_CLEAR: MetricsPolicy
METRICS_MASKED: MetricsPolicy
METRICS_WITHHELD: MetricsPolicy

class DeviceProof(_message.Message):
    __slots__ = ("public_key", "timestamp_ms", "nonce", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    timestamp_ms: int
    nonce: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("api_version", "proof", "enrollment_token", "attestation")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    proof: DeviceProof
    enrollment_token: str
    attestation: bytes
    def __init__(self, api_version: _Optional[int] = ..., proof: _Optional[_Union[DeviceProof, _Mapping]] = ..., enrollment_token: _Optional[str] = ..., attestation: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("api_version", "device_id", "attributes", "task_id", "proof", "data_schema", "declined_task_ids", "stratum")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    DATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    DECLINED_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    STRATUM_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    device_id: str
    attributes: _common_pb2.DeviceAttributes
    task_id: str
    proof: DeviceProof
    data_schema: _common_pb2.DataSchema
    declined_task_ids: _containers.RepeatedScalarFieldContainer[str]
    stratum: str
    def __init__(self, api_version: _Optional[int] = ..., device_id: _Optional[str] = ..., attributes: _Optional[_Union[_common_pb2.DeviceAttributes, _Mapping]] = ..., task_id: _Optional[str] = ..., proof: _Optional[_Union[DeviceProof, _Mapping]] = ..., data_schema: _Optional[_Union[_common_pb2.DataSchema, _Mapping]] = ..., declined_task_ids: _Optional[_Iterable[str]] = ..., stratum: _Optional[str] = ...) -> None: ...

class CheckInResponse(_message.Message):
    __slots__ = ("outcome", "task_id", "round_number", "participation_token", "retry_after_ms", "message")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OUTCOME_UNSPECIFIED: _ClassVar[CheckInResponse.Outcome]
        ACCEPTED: _ClassVar[CheckInResponse.Outcome]
        RETRY_LATER: _ClassVar[CheckInResponse.Outcome]
        NO_TASK: _ClassVar[CheckInResponse.Outcome]
        FINISHED: _ClassVar[CheckInResponse.Outcome]
    OUTCOME_UNSPECIFIED: CheckInResponse.Outcome
    ACCEPTED: CheckInResponse.Outcome
    RETRY_LATER: CheckInResponse.Outcome
    NO_TASK: CheckInResponse.Outcome
    FINISHED: CheckInResponse.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    outcome: CheckInResponse.Outcome
    task_id: str
    round_number: int
    participation_token: str
    retry_after_ms: int
    message: str
    def __init__(self, outcome: _Optional[_Union[CheckInResponse.Outcome, str]] = ..., task_id: _Optional[str] = ..., round_number: _Optional[int] = ..., participation_token: _Optional[str] = ..., retry_after_ms: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Participation(_message.Message):
    __slots__ = ("device_id", "task_id", "round_number", "token")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    task_id: str
    round_number: int
    token: str
    def __init__(self, device_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round_number: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("api_version", "participation")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ...) -> None: ...

class GetPlanResponse(_message.Message):
    __slots__ = ("task_id", "round_number", "model", "model_version", "model_sha256", "model_size_bytes", "local", "evaluate", "deadline_unix_ms", "max_update_bytes", "max_chunk_bytes", "update_tensors", "seed", "secure_aggregation", "privacy", "metrics", "shard_upload")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SHARD_UPLOAD_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round_number: int
    model: _common_pb2.ModelSpec
    model_version: int
    model_sha256: str
    model_size_bytes: int
    local: _common_pb2.LocalTraining
    evaluate: bool
    deadline_unix_ms: int
    max_update_bytes: int
    max_chunk_bytes: int
    update_tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorSpec]
    seed: int
    secure_aggregation: SecAggPlan
    privacy: DevicePrivacy
    metrics: MetricsPolicy
    shard_upload: ShardUpload
    def __init__(self, task_id: _Optional[str] = ..., round_number: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., model_version: _Optional[int] = ..., model_sha256: _Optional[str] = ..., model_size_bytes: _Optional[int] = ..., local: _Optional[_Union[_common_pb2.LocalTraining, _Mapping]] = ..., evaluate: bool = ..., deadline_unix_ms: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., update_tensors: _Optional[_Iterable[_Union[_common_pb2.TensorSpec, _Mapping]]] = ..., seed: _Optional[int] = ..., secure_aggregation: _Optional[_Union[SecAggPlan, _Mapping]] = ..., privacy: _Optional[_Union[DevicePrivacy, _Mapping]] = ..., metrics: _Optional[_Union[MetricsPolicy, str]] = ..., shard_upload: _Optional[_Union[ShardUpload, _Mapping]] = ...) -> None: ...

class ShardUpload(_message.Message):
    __slots__ = ("address", "ticket")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    address: str
    ticket: UploadTicket
    def __init__(self, address: _Optional[str] = ..., ticket: _Optional[_Union[UploadTicket, _Mapping]] = ...) -> None: ...

class UploadTicket(_message.Message):
    __slots__ = ("body", "mac")
    BODY_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    mac: bytes
    def __init__(self, body: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class DevicePrivacy(_message.Message):
    __slots__ = ("l2_clip_norm", "report_unclipped", "local_noise_multiplier", "local_max_grad_norm", "local_delta", "distributed_noise_steps", "devices_planned", "local_max_epsilon")
    L2_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    REPORT_UNCLIPPED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DELTA_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_NOISE_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_PLANNED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    l2_clip_norm: float
    report_unclipped: bool
    local_noise_multiplier: float
    local_max_grad_norm: float
    local_delta: float
    distributed_noise_steps: float
    devices_planned: int
    local_max_epsilon: float
    def __init__(self, l2_clip_norm: _Optional[float] = ..., report_unclipped: bool = ..., local_noise_multiplier: _Optional[float] = ..., local_max_grad_norm: _Optional[float] = ..., local_delta: _Optional[float] = ..., distributed_noise_steps: _Optional[float] = ..., devices_planned: _Optional[int] = ..., local_max_epsilon: _Optional[float] = ...) -> None: ...

class SecAggPlan(_message.Message):
    __slots__ = ("num_devices", "neighbours", "threshold", "value_bits", "ring_bits", "clip", "weight_cap", "context", "phase_timeout_ms")
    NUM_DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PHASE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    num_devices: int
    neighbours: int
    threshold: int
    value_bits: int
    ring_bits: int
    clip: float
    weight_cap: int
    context: bytes
    phase_timeout_ms: int
    def __init__(self, num_devices: _Optional[int] = ..., neighbours: _Optional[int] = ..., threshold: _Optional[int] = ..., value_bits: _Optional[int] = ..., ring_bits: _Optional[int] = ..., clip: _Optional[float] = ..., weight_cap: _Optional[int] = ..., context: _Optional[bytes] = ..., phase_timeout_ms: _Optional[int] = ...) -> None: ...

class SecAggAdvertiseKeysRequest(_message.Message):
    __slots__ = ("api_version", "participation", "encryption_public_key", "mask_public_key", "config_hash")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    encryption_public_key: bytes
    mask_public_key: bytes
    config_hash: bytes
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., config_hash: _Optional[bytes] = ...) -> None: ...

class SecAggPeer(_message.Message):
    __slots__ = ("index", "encryption_public_key", "mask_public_key", "config_hash")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    index: int
    encryption_public_key: bytes
    mask_public_key: bytes
    config_hash: bytes
    def __init__(self, index: _Optional[int] = ..., encryption_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., config_hash: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeysInstruction(_message.Message):
    __slots__ = ("index", "peers")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    peers: _containers.RepeatedCompositeFieldContainer[SecAggPeer]
    def __init__(self, index: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[SecAggPeer, _Mapping]]] = ...) -> None: ...

class SecAggCiphertext(_message.Message):
    __slots__ = ("peer", "ciphertext")
    PEER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    peer: int
    ciphertext: bytes
    def __init__(self, peer: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeysRequest(_message.Message):
    __slots__ = ("api_version", "participation", "ciphertexts")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggMaskInstruction(_message.Message):
    __slots__ = ("ciphertexts",)
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    ciphertexts: _containers.RepeatedCompositeFieldContainer[SecAggCiphertext]
    def __init__(self, ciphertexts: _Optional[_Iterable[_Union[SecAggCiphertext, _Mapping]]] = ...) -> None: ...

class SecAggMaskedInputRequest(_message.Message):
    __slots__ = ("api_version", "participation", "masked_input", "metrics", "clipped_values")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CLIPPED_VALUES_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    masked_input: bytes
    metrics: _containers.ScalarMap[str, float]
    clipped_values: int
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., masked_input: _Optional[bytes] = ..., metrics: _Optional[_Mapping[str, float]] = ..., clipped_values: _Optional[int] = ...) -> None: ...

class SecAggUnmaskInstruction(_message.Message):
    __slots__ = ("survivors", "dropped")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    share: bytes
    def __init__(self, owner: _Optional[int] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("api_version", "participation", "seed_shares", "key_shares")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    seed_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., seed_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("api_version", "participation", "model_version")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    model_version: int
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.BlobHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[_common_pb2.BlobHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("api_version", "participation", "num_examples", "tensors", "total_bytes", "sha256", "metrics", "upload_id", "ticket")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    num_examples: int
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorSpec]
    total_bytes: int
    sha256: str
    metrics: _containers.ScalarMap[str, float]
    upload_id: str
    ticket: UploadTicket
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., num_examples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., upload_id: _Optional[str] = ..., ticket: _Optional[_Union[UploadTicket, _Mapping]] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("accepted", "message")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    def __init__(self, accepted: bool = ..., message: _Optional[str] = ...) -> None: ...

class ReportStatusRequest(_message.Message):
    __slots__ = ("api_version", "participation", "metrics", "error", "decline")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTICIPATION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    participation: Participation
    metrics: _containers.ScalarMap[str, float]
    error: str
    decline: bool
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ..., decline: bool = ...) -> None: ...

class ReportStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
