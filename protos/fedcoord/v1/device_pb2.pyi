from protos.fedcoord.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CheckInRequest(_message.Message):
    __slots__ = ("api_version", "device_id", "attributes", "task_id")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    device_id: str
    attributes: _common_pb2.DeviceAttributes
    task_id: str
    def __init__(self, api_version: _Optional[int] = ..., device_id: _Optional[str] = ..., attributes: _Optional[_Union[_common_pb2.DeviceAttributes, _Mapping]] = ..., task_id: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("task_id", "round_number", "model", "model_version", "model_sha256", "model_size_bytes", "local", "evaluate", "deadline_unix_ms", "max_update_bytes", "max_chunk_bytes", "update_tensors", "seed")
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
    def __init__(self, task_id: _Optional[str] = ..., round_number: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelSpec, _Mapping]] = ..., model_version: _Optional[int] = ..., model_sha256: _Optional[str] = ..., model_size_bytes: _Optional[int] = ..., local: _Optional[_Union[_common_pb2.LocalTraining, _Mapping]] = ..., evaluate: bool = ..., deadline_unix_ms: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., update_tensors: _Optional[_Iterable[_Union[_common_pb2.TensorSpec, _Mapping]]] = ..., seed: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("api_version", "participation", "num_examples", "tensors", "total_bytes", "sha256", "metrics")
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
    api_version: int
    participation: Participation
    num_examples: int
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorSpec]
    total_bytes: int
    sha256: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., num_examples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

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
    __slots__ = ("api_version", "participation", "metrics", "error")
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
    api_version: int
    participation: Participation
    metrics: _containers.ScalarMap[str, float]
    error: str
    def __init__(self, api_version: _Optional[int] = ..., participation: _Optional[_Union[Participation, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ...) -> None: ...

class ReportStatusResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
