from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("schema", "seq", "kind", "task_id", "at_unix_s", "round_number", "device_id", "reason", "detail", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    schema: int
    seq: int
    kind: str
    task_id: str
    at_unix_s: float
    round_number: int
    device_id: str
    reason: str
    detail: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, schema: _Optional[int] = ..., seq: _Optional[int] = ..., kind: _Optional[str] = ..., task_id: _Optional[str] = ..., at_unix_s: _Optional[float] = ..., round_number: _Optional[int] = ..., device_id: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...
