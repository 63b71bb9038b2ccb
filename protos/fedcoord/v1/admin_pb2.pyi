from protos.fedcoord.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(_message.Message):
    __slots__ = ("task_id", "spec", "state", "rounds_committed", "model_version", "reason", "created_unix_ms", "current_round", "privacy", "metrics_release")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_RELEASE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    spec: _common_pb2.TaskSpec
    state: str
    rounds_committed: int
    model_version: int
    reason: str
    created_unix_ms: int
    current_round: Round
    privacy: TaskPrivacy
    metrics_release: str
    def __init__(self, task_id: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.TaskSpec, _Mapping]] = ..., state: _Optional[str] = ..., rounds_committed: _Optional[int] = ..., model_version: _Optional[int] = ..., reason: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., current_round: _Optional[_Union[Round, _Mapping]] = ..., privacy: _Optional[_Union[TaskPrivacy, _Mapping]] = ..., metrics_release: _Optional[str] = ...) -> None: ...

class TaskPrivacy(_message.Message):
    __slots__ = ("epsilon", "delta", "budget", "sampling", "rounds_accounted", "last_sampling_rate", "last_eligible", "last_cohort", "last_population")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_ACCOUNTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SAMPLING_RATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ELIGIBLE_FIELD_NUMBER: _ClassVar[int]
    LAST_COHORT_FIELD_NUMBER: _ClassVar[int]
    LAST_POPULATION_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    budget: float
    sampling: str
    rounds_accounted: int
    last_sampling_rate: float
    last_eligible: int
    last_cohort: int
    last_population: int
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., budget: _Optional[float] = ..., sampling: _Optional[str] = ..., rounds_accounted: _Optional[int] = ..., last_sampling_rate: _Optional[float] = ..., last_eligible: _Optional[int] = ..., last_cohort: _Optional[int] = ..., last_population: _Optional[int] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round_number", "attempt", "state", "selected", "reports", "goal", "started_unix_ms", "deadline_unix_ms", "ended_unix_ms", "failure_reason", "model_version", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    GOAL_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round_number: int
    attempt: int
    state: str
    selected: int
    reports: int
    goal: int
    started_unix_ms: int
    deadline_unix_ms: int
    ended_unix_ms: int
    failure_reason: str
    model_version: int
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round_number: _Optional[int] = ..., attempt: _Optional[int] = ..., state: _Optional[str] = ..., selected: _Optional[int] = ..., reports: _Optional[int] = ..., goal: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., deadline_unix_ms: _Optional[int] = ..., ended_unix_ms: _Optional[int] = ..., failure_reason: _Optional[str] = ..., model_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CreateTaskRequest(_message.Message):
    __slots__ = ("api_version", "spec")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    spec: _common_pb2.TaskSpec
    def __init__(self, api_version: _Optional[int] = ..., spec: _Optional[_Union[_common_pb2.TaskSpec, _Mapping]] = ...) -> None: ...

class CreateTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("api_version", "task_id")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    task_id: str
    def __init__(self, api_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("api_version",)
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    def __init__(self, api_version: _Optional[int] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("api_version", "task_id")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    task_id: str
    def __init__(self, api_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class ListRoundsResponse(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("api_version", "task_id")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    task_id: str
    def __init__(self, api_version: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class AdminDownloadModelRequest(_message.Message):
    __slots__ = ("api_version", "task_id", "version")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    task_id: str
    version: int
    def __init__(self, api_version: _Optional[int] = ..., task_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdminDownloadModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.BlobHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[_common_pb2.BlobHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
