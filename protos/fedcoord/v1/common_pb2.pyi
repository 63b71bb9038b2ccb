from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class BlobHeader(_message.Message):
    __slots__ = ("size_bytes", "sha256", "format", "version")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    sha256: str
    format: str
    version: int
    def __init__(self, size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., format: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("architecture", "arguments_json")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_JSON_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    arguments_json: str
    def __init__(self, architecture: _Optional[str] = ..., arguments_json: _Optional[str] = ...) -> None: ...

class Eligibility(_message.Message):
    __slots__ = ("require_charging", "require_unmetered", "require_idle", "arm")
    REQUIRE_CHARGING_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_UNMETERED_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_IDLE_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    require_charging: bool
    require_unmetered: bool
    require_idle: bool
    arm: ArmFilter
    def __init__(self, require_charging: bool = ..., require_unmetered: bool = ..., require_idle: bool = ..., arm: _Optional[_Union[ArmFilter, _Mapping]] = ...) -> None: ...

class ArmFilter(_message.Message):
    __slots__ = ("salt", "weights", "index")
    SALT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    salt: str
    weights: _containers.RepeatedScalarFieldContainer[float]
    index: int
    def __init__(self, salt: _Optional[str] = ..., weights: _Optional[_Iterable[float]] = ..., index: _Optional[int] = ...) -> None: ...

class DeviceAttributes(_message.Message):
    __slots__ = ("charging", "unmetered", "idle", "population")
    CHARGING_FIELD_NUMBER: _ClassVar[int]
    UNMETERED_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    charging: bool
    unmetered: bool
    idle: bool
    population: str
    def __init__(self, charging: bool = ..., unmetered: bool = ..., idle: bool = ..., population: _Optional[str] = ...) -> None: ...

class LocalTraining(_message.Message):
    __slots__ = ("epochs", "batch_size", "optimizer", "learning_rate", "momentum")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    momentum: float
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[str] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ...) -> None: ...

class ServerOptimizer(_message.Message):
    __slots__ = ("kind", "learning_rate", "momentum", "beta1", "beta2", "epsilon")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    learning_rate: float
    momentum: float
    beta1: float
    beta2: float
    epsilon: float
    def __init__(self, kind: _Optional[str] = ..., learning_rate: _Optional[float] = ..., momentum: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("fraction", "server_data")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SERVER_DATA_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    server_data: str
    def __init__(self, fraction: _Optional[float] = ..., server_data: _Optional[str] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("name", "model", "rounds", "clients_per_round", "min_reports", "population", "eligibility", "over_selection", "round_deadline_s", "selection_window_s", "local", "server", "evaluation", "max_update_bytes", "seed", "secure_aggregation", "privacy_json", "robustness", "data_schema", "aggregation_json", "kind", "evaluate_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MIN_REPORTS_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    ELIGIBILITY_FIELD_NUMBER: _ClassVar[int]
    OVER_SELECTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    SELECTION_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_JSON_FIELD_NUMBER: _ClassVar[int]
    ROBUSTNESS_FIELD_NUMBER: _ClassVar[int]
    DATA_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_JSON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelSpec
    rounds: int
    clients_per_round: int
    min_reports: int
    population: str
    eligibility: Eligibility
    over_selection: float
    round_deadline_s: float
    selection_window_s: float
    local: LocalTraining
    server: ServerOptimizer
    evaluation: Evaluation
    max_update_bytes: int
    seed: int
    secure_aggregation: SecureAggregation
    privacy_json: str
    robustness: Robustness
    data_schema: DataSchema
    aggregation_json: str
    kind: str
    evaluate_json: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., rounds: _Optional[int] = ..., clients_per_round: _Optional[int] = ..., min_reports: _Optional[int] = ..., population: _Optional[str] = ..., eligibility: _Optional[_Union[Eligibility, _Mapping]] = ..., over_selection: _Optional[float] = ..., round_deadline_s: _Optional[float] = ..., selection_window_s: _Optional[float] = ..., local: _Optional[_Union[LocalTraining, _Mapping]] = ..., server: _Optional[_Union[ServerOptimizer, _Mapping]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., max_update_bytes: _Optional[int] = ..., seed: _Optional[int] = ..., secure_aggregation: _Optional[_Union[SecureAggregation, _Mapping]] = ..., privacy_json: _Optional[str] = ..., robustness: _Optional[_Union[Robustness, _Mapping]] = ..., data_schema: _Optional[_Union[DataSchema, _Mapping]] = ..., aggregation_json: _Optional[str] = ..., kind: _Optional[str] = ..., evaluate_json: _Optional[str] = ...) -> None: ...

class DataSchema(_message.Message):
    __slots__ = ("feature_shape", "num_classes")
    FEATURE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    feature_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, feature_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class Robustness(_message.Message):
    __slots__ = ("weight_cap", "max_update_l2_norm", "max_abs_parameter")
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_L2_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    weight_cap: int
    max_update_l2_norm: float
    max_abs_parameter: float
    def __init__(self, weight_cap: _Optional[int] = ..., max_update_l2_norm: _Optional[float] = ..., max_abs_parameter: _Optional[float] = ...) -> None: ...

class SecureAggregation(_message.Message):
    __slots__ = ("protocol", "neighbours", "threshold", "clip", "bits", "dropout", "corrupt_fraction", "adversary", "weight_cap", "phase_timeout_s")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ADVERSARY_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    PHASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    neighbours: int
    threshold: float
    clip: float
    bits: int
    dropout: float
    corrupt_fraction: float
    adversary: str
    weight_cap: int
    phase_timeout_s: float
    def __init__(self, protocol: _Optional[str] = ..., neighbours: _Optional[int] = ..., threshold: _Optional[float] = ..., clip: _Optional[float] = ..., bits: _Optional[int] = ..., dropout: _Optional[float] = ..., corrupt_fraction: _Optional[float] = ..., adversary: _Optional[str] = ..., weight_cap: _Optional[int] = ..., phase_timeout_s: _Optional[float] = ...) -> None: ...
