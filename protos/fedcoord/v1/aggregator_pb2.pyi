from protos.fedcoord.v1 import device_pb2 as _device_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShardRoundKey(_message.Message):
    __slots__ = ("task_id", "round_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round_id: int
    def __init__(self, task_id: _Optional[str] = ..., round_id: _Optional[int] = ...) -> None: ...

class RoundProgressRequest(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[ShardRoundKey]
    def __init__(self, rounds: _Optional[_Iterable[_Union[ShardRoundKey, _Mapping]]] = ...) -> None: ...

class ShardRoundProgress(_message.Message):
    __slots__ = ("round", "reported", "collected")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    COLLECTED_FIELD_NUMBER: _ClassVar[int]
    round: ShardRoundKey
    reported: _containers.RepeatedScalarFieldContainer[str]
    collected: bool
    def __init__(self, round: _Optional[_Union[ShardRoundKey, _Mapping]] = ..., reported: _Optional[_Iterable[str]] = ..., collected: bool = ...) -> None: ...

class RoundProgressResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[ShardRoundProgress]
    def __init__(self, rounds: _Optional[_Iterable[_Union[ShardRoundProgress, _Mapping]]] = ...) -> None: ...

class CollectRoundRequest(_message.Message):
    __slots__ = ("round", "max_chunk_bytes")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    round: ShardRoundKey
    max_chunk_bytes: int
    def __init__(self, round: _Optional[_Union[ShardRoundKey, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class PartialSumHeader(_message.Message):
    __slots__ = ("round", "mode", "reported", "weight", "unclipped", "metric_sums", "metric_weights", "values", "sha256")
    class MetricSumsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNCLIPPED_FIELD_NUMBER: _ClassVar[int]
    METRIC_SUMS_FIELD_NUMBER: _ClassVar[int]
    METRIC_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round: ShardRoundKey
    mode: str
    reported: _containers.RepeatedScalarFieldContainer[str]
    weight: float
    unclipped: float
    metric_sums: _containers.ScalarMap[str, float]
    metric_weights: _containers.ScalarMap[str, float]
    values: int
    sha256: str
    def __init__(self, round: _Optional[_Union[ShardRoundKey, _Mapping]] = ..., mode: _Optional[str] = ..., reported: _Optional[_Iterable[str]] = ..., weight: _Optional[float] = ..., unclipped: _Optional[float] = ..., metric_sums: _Optional[_Mapping[str, float]] = ..., metric_weights: _Optional[_Mapping[str, float]] = ..., values: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class CollectRoundResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PartialSumHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[PartialSumHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DropRoundRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: ShardRoundKey
    def __init__(self, round: _Optional[_Union[ShardRoundKey, _Mapping]] = ...) -> None: ...

class DropRoundResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
