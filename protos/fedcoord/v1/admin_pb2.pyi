from protos.fedcoord.v1 import common_pb2 as _common_pb2
from protos.fedcoord.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(_message.Message):
    __slots__ = ("task_id", "spec", "state", "rounds_committed", "model_version", "reason", "created_unix_ms", "current_round", "privacy", "metrics_release", "declines_by_reason")
    class DeclinesByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
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
    DECLINES_BY_REASON_FIELD_NUMBER: _ClassVar[int]
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
    declines_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, task_id: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.TaskSpec, _Mapping]] = ..., state: _Optional[str] = ..., rounds_committed: _Optional[int] = ..., model_version: _Optional[int] = ..., reason: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., current_round: _Optional[_Union[Round, _Mapping]] = ..., privacy: _Optional[_Union[TaskPrivacy, _Mapping]] = ..., metrics_release: _Optional[str] = ..., declines_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

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
    __slots__ = ("task", "launch_checks")
    TASK_FIELD_NUMBER: _ClassVar[int]
    LAUNCH_CHECKS_FIELD_NUMBER: _ClassVar[int]
    task: Task
    launch_checks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., launch_checks: _Optional[_Iterable[str]] = ...) -> None: ...

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
    __slots__ = ("api_version", "task_id", "reason")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    task_id: str
    reason: str
    def __init__(self, api_version: _Optional[int] = ..., task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("api_version", "task_id", "after_seq", "limit")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    task_id: str
    after_seq: int
    limit: int
    def __init__(self, api_version: _Optional[int] = ..., task_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events", "task_state", "task_final")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TASK_STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FINAL_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_events_pb2.Event]
    task_state: str
    task_final: bool
    def __init__(self, events: _Optional[_Iterable[_Union[_events_pb2.Event, _Mapping]]] = ..., task_state: _Optional[str] = ..., task_final: bool = ...) -> None: ...

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

class ApiToken(_message.Message):
    __slots__ = ("token_id", "role", "label", "created_unix_ms", "expires_unix_ms", "revoked")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    role: str
    label: str
    created_unix_ms: int
    expires_unix_ms: int
    revoked: bool
    def __init__(self, token_id: _Optional[str] = ..., role: _Optional[str] = ..., label: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., revoked: bool = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("api_version", "role", "label", "expires_in_s")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    role: str
    label: str
    expires_in_s: int
    def __init__(self, api_version: _Optional[int] = ..., role: _Optional[str] = ..., label: _Optional[str] = ..., expires_in_s: _Optional[int] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "secret")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    token: ApiToken
    secret: str
    def __init__(self, token: _Optional[_Union[ApiToken, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("api_version",)
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    def __init__(self, api_version: _Optional[int] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[ApiToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[ApiToken, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("api_version", "token_id")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    token_id: str
    def __init__(self, api_version: _Optional[int] = ..., token_id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: ApiToken
    def __init__(self, token: _Optional[_Union[ApiToken, _Mapping]] = ...) -> None: ...

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("api_version", "max_devices", "expires_in_s", "label")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_S_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    max_devices: int
    expires_in_s: int
    label: str
    def __init__(self, api_version: _Optional[int] = ..., max_devices: _Optional[int] = ..., expires_in_s: _Optional[int] = ..., label: _Optional[str] = ...) -> None: ...

class CreateEnrollmentTokenResponse(_message.Message):
    __slots__ = ("token_id", "secret", "max_devices", "expires_unix_ms")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    secret: str
    max_devices: int
    expires_unix_ms: int
    def __init__(self, token_id: _Optional[str] = ..., secret: _Optional[str] = ..., max_devices: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "public_key", "enrolled_unix_ms", "revoked_unix_ms", "enrollment_token_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    public_key: bytes
    enrolled_unix_ms: int
    revoked_unix_ms: int
    enrollment_token_id: str
    def __init__(self, device_id: _Optional[str] = ..., public_key: _Optional[bytes] = ..., enrolled_unix_ms: _Optional[int] = ..., revoked_unix_ms: _Optional[int] = ..., enrollment_token_id: _Optional[str] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("api_version",)
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    def __init__(self, api_version: _Optional[int] = ...) -> None: ...

class ListDevicesResponse(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ...) -> None: ...

class RevokeDeviceRequest(_message.Message):
    __slots__ = ("api_version", "device_id")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    device_id: str
    def __init__(self, api_version: _Optional[int] = ..., device_id: _Optional[str] = ...) -> None: ...

class RevokeDeviceResponse(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: Device
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("entry_id", "at_unix_ms", "actor", "action", "target", "outcome", "detail")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    entry_id: int
    at_unix_ms: int
    actor: str
    action: str
    target: str
    outcome: str
    detail: str
    def __init__(self, entry_id: _Optional[int] = ..., at_unix_ms: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("api_version", "limit")
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    limit: int
    def __init__(self, api_version: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ("api_version",)
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    api_version: int
    def __init__(self, api_version: _Optional[int] = ...) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("actor", "role")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    actor: str
    role: str
    def __init__(self, actor: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...
