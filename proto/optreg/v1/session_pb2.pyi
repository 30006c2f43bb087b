import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from optreg.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StepReply(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_REPLY_UNSPECIFIED: _ClassVar[StepReply]
    STEP_REPLY_PARAMETERS: _ClassVar[StepReply]
    STEP_REPLY_DELTA: _ClassVar[StepReply]
    STEP_REPLY_NONE: _ClassVar[StepReply]
    STEP_REPLY_BF16_DELTA: _ClassVar[StepReply]

class Durability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DURABILITY_UNSPECIFIED: _ClassVar[Durability]
    DURABILITY_EVERY_STEP: _ClassVar[Durability]
    DURABILITY_PERIODIC: _ClassVar[Durability]
    DURABILITY_NONE: _ClassVar[Durability]
    DURABILITY_LOG: _ClassVar[Durability]

class WorkerMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_MODE_UNSPECIFIED: _ClassVar[WorkerMode]
    WORKER_MODE_SYNC: _ClassVar[WorkerMode]
    WORKER_MODE_ASYNC: _ClassVar[WorkerMode]
    WORKER_MODE_SSP: _ClassVar[WorkerMode]

class Combine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMBINE_UNSPECIFIED: _ClassVar[Combine]
    COMBINE_MEAN: _ClassVar[Combine]
    COMBINE_SUM: _ClassVar[Combine]
STEP_REPLY_UNSPECIFIED: StepReply
STEP_REPLY_PARAMETERS: StepReply
STEP_REPLY_DELTA: StepReply
STEP_REPLY_NONE: StepReply
STEP_REPLY_BF16_DELTA: StepReply
DURABILITY_UNSPECIFIED: Durability
DURABILITY_EVERY_STEP: Durability
DURABILITY_PERIODIC: Durability
DURABILITY_NONE: Durability
DURABILITY_LOG: Durability
WORKER_MODE_UNSPECIFIED: WorkerMode
WORKER_MODE_SYNC: WorkerMode
WORKER_MODE_ASYNC: WorkerMode
WORKER_MODE_SSP: WorkerMode
COMBINE_UNSPECIFIED: Combine
COMBINE_MEAN: Combine
COMBINE_SUM: Combine

class SessionConfig(_message.Message):
    __slots__ = ("optimizer", "hyperparameters", "master_dtype", "step_reply", "session_id", "durability", "periodic_steps", "periodic_seconds", "workers", "schedule", "schedule_parameters", "shards")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ScheduleParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MASTER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_REPLY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    PERIODIC_STEPS_FIELD_NUMBER: _ClassVar[int]
    PERIODIC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    optimizer: str
    hyperparameters: _containers.ScalarMap[str, float]
    master_dtype: _tensor_pb2.DataType
    step_reply: StepReply
    session_id: str
    durability: Durability
    periodic_steps: int
    periodic_seconds: float
    workers: WorkerConfig
    schedule: str
    schedule_parameters: _containers.ScalarMap[str, float]
    shards: int
    def __init__(self, optimizer: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., master_dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., step_reply: _Optional[_Union[StepReply, str]] = ..., session_id: _Optional[str] = ..., durability: _Optional[_Union[Durability, str]] = ..., periodic_steps: _Optional[int] = ..., periodic_seconds: _Optional[float] = ..., workers: _Optional[_Union[WorkerConfig, _Mapping]] = ..., schedule: _Optional[str] = ..., schedule_parameters: _Optional[_Mapping[str, float]] = ..., shards: _Optional[int] = ...) -> None: ...

class WorkerConfig(_message.Message):
    __slots__ = ("workers", "mode", "min_workers", "round_deadline_seconds", "lease_seconds", "combine", "staleness", "scale_lr_by_staleness")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    SCALE_LR_BY_STALENESS_FIELD_NUMBER: _ClassVar[int]
    workers: int
    mode: WorkerMode
    min_workers: int
    round_deadline_seconds: float
    lease_seconds: float
    combine: Combine
    staleness: int
    scale_lr_by_staleness: bool
    def __init__(self, workers: _Optional[int] = ..., mode: _Optional[_Union[WorkerMode, str]] = ..., min_workers: _Optional[int] = ..., round_deadline_seconds: _Optional[float] = ..., lease_seconds: _Optional[float] = ..., combine: _Optional[_Union[Combine, str]] = ..., staleness: _Optional[int] = ..., scale_lr_by_staleness: _Optional[bool] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("worker", "contributions", "last_round", "last_contact", "joined_at")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTACT_FIELD_NUMBER: _ClassVar[int]
    JOINED_AT_FIELD_NUMBER: _ClassVar[int]
    worker: str
    contributions: int
    last_round: int
    last_contact: _timestamp_pb2.Timestamp
    joined_at: _timestamp_pb2.Timestamp
    def __init__(self, worker: _Optional[str] = ..., contributions: _Optional[int] = ..., last_round: _Optional[int] = ..., last_contact: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., joined_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "contributors", "stragglers", "seconds", "noise_scale")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    STRAGGLERS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOISE_SCALE_FIELD_NUMBER: _ClassVar[int]
    round: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    stragglers: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    noise_scale: float
    def __init__(self, round: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., stragglers: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ..., noise_scale: _Optional[float] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "optimizer", "hyperparameters", "step", "master_dtype", "step_reply", "parameters", "slots", "created_at", "last_used_at", "durability", "periodic_steps", "periodic_seconds", "persisted_step", "loaded", "quarantined", "workers", "members", "open_round", "last_round", "missing_optimizer", "schedule", "schedule_parameters", "size_bytes", "unsaved_steps", "unsaved_seconds")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ScheduleParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MASTER_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_REPLY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    PERIODIC_STEPS_FIELD_NUMBER: _ClassVar[int]
    PERIODIC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PERSISTED_STEP_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    MISSING_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNSAVED_STEPS_FIELD_NUMBER: _ClassVar[int]
    UNSAVED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    optimizer: str
    hyperparameters: _containers.ScalarMap[str, float]
    step: int
    master_dtype: _tensor_pb2.DataType
    step_reply: StepReply
    parameters: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    slots: _containers.RepeatedScalarFieldContainer[str]
    created_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    durability: Durability
    periodic_steps: int
    periodic_seconds: float
    persisted_step: int
    loaded: bool
    quarantined: str
    workers: WorkerConfig
    members: _containers.RepeatedCompositeFieldContainer[Member]
    open_round: int
    last_round: RoundInfo
    missing_optimizer: str
    schedule: str
    schedule_parameters: _containers.ScalarMap[str, float]
    size_bytes: int
    unsaved_steps: int
    unsaved_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., optimizer: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., step: _Optional[int] = ..., master_dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., step_reply: _Optional[_Union[StepReply, str]] = ..., parameters: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., slots: _Optional[_Iterable[str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., durability: _Optional[_Union[Durability, str]] = ..., periodic_steps: _Optional[int] = ..., periodic_seconds: _Optional[float] = ..., persisted_step: _Optional[int] = ..., loaded: _Optional[bool] = ..., quarantined: _Optional[str] = ..., workers: _Optional[_Union[WorkerConfig, _Mapping]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., open_round: _Optional[int] = ..., last_round: _Optional[_Union[RoundInfo, _Mapping]] = ..., missing_optimizer: _Optional[str] = ..., schedule: _Optional[str] = ..., schedule_parameters: _Optional[_Mapping[str, float]] = ..., size_bytes: _Optional[int] = ..., unsaved_steps: _Optional[int] = ..., unsaved_seconds: _Optional[float] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("config", "parameters", "state", "initial_step")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STEP_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    state: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SlotTensors]
    initial_step: int
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., state: _Optional[_Iterable[_Union[_tensor_pb2.SlotTensors, _Mapping]]] = ..., initial_step: _Optional[int] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class CreateSessionStreamRequest(_message.Message):
    __slots__ = ("config", "initial_step", "slot", "chunks")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STEP_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    initial_step: int
    slot: str
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., initial_step: _Optional[int] = ..., slot: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class CreateSessionStreamResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step", "gradients", "hyperparameters", "metrics", "worker", "round", "sparse", "compressed")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    gradients: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    hyperparameters: _containers.ScalarMap[str, float]
    metrics: _containers.ScalarMap[str, float]
    worker: str
    round: int
    sparse: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SparseRows]
    compressed: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.CompressedTensor]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., gradients: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., worker: _Optional[str] = ..., round: _Optional[int] = ..., sparse: _Optional[_Iterable[_Union[_tensor_pb2.SparseRows, _Mapping]]] = ..., compressed: _Optional[_Iterable[_Union[_tensor_pb2.CompressedTensor, _Mapping]]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step", "replayed", "tensors", "round", "staleness", "contributors", "sparse", "lr")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    step: int
    replayed: bool
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    round: int
    staleness: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    sparse: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SparseRows]
    lr: float
    def __init__(self, step: _Optional[int] = ..., replayed: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., round: _Optional[int] = ..., staleness: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., sparse: _Optional[_Iterable[_Union[_tensor_pb2.SparseRows, _Mapping]]] = ..., lr: _Optional[float] = ...) -> None: ...

class StepStreamRequest(_message.Message):
    __slots__ = ("session_id", "step", "chunks", "hyperparameters", "metrics", "worker", "round", "sparse")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    hyperparameters: _containers.ScalarMap[str, float]
    metrics: _containers.ScalarMap[str, float]
    worker: str
    round: int
    sparse: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SparseRows]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., worker: _Optional[str] = ..., round: _Optional[int] = ..., sparse: _Optional[_Iterable[_Union[_tensor_pb2.SparseRows, _Mapping]]] = ...) -> None: ...

class StepStreamResponse(_message.Message):
    __slots__ = ("step", "replayed", "chunks", "round", "staleness", "contributors", "sparse", "provisional", "lr")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    step: int
    replayed: bool
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    round: int
    staleness: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    sparse: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SparseRows]
    provisional: bool
    lr: float
    def __init__(self, step: _Optional[int] = ..., replayed: _Optional[bool] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., round: _Optional[int] = ..., staleness: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., sparse: _Optional[_Iterable[_Union[_tensor_pb2.SparseRows, _Mapping]]] = ..., provisional: _Optional[bool] = ..., lr: _Optional[float] = ...) -> None: ...

class ReadParametersRequest(_message.Message):
    __slots__ = ("session_id", "names")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadParametersResponse(_message.Message):
    __slots__ = ("step", "parameters")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, step: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class ReadParametersStreamRequest(_message.Message):
    __slots__ = ("session_id", "names")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadParametersStreamResponse(_message.Message):
    __slots__ = ("step", "chunks")
    STEP_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    step: int
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, step: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class ReadStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReadStateResponse(_message.Message):
    __slots__ = ("session", "parameters", "state")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    parameters: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    state: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.SlotTensors]
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., parameters: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., state: _Optional[_Iterable[_Union[_tensor_pb2.SlotTensors, _Mapping]]] = ...) -> None: ...

class ReadStateStreamRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReadStateStreamResponse(_message.Message):
    __slots__ = ("session", "slot", "chunks")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    slot: str
    chunks: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., slot: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class UpdateHyperparametersRequest(_message.Message):
    __slots__ = ("session_id", "hyperparameters")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hyperparameters: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class UpdateHyperparametersResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("session_id", "key", "byte_size", "resident", "parameters", "pid", "fd")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FD_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    key: str
    byte_size: int
    resident: bool
    parameters: _containers.RepeatedCompositeFieldContainer[SharedMemoryTensor]
    pid: int
    fd: int
    def __init__(self, session_id: _Optional[str] = ..., key: _Optional[str] = ..., byte_size: _Optional[int] = ..., resident: _Optional[bool] = ..., parameters: _Optional[_Iterable[_Union[SharedMemoryTensor, _Mapping]]] = ..., pid: _Optional[int] = ..., fd: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("byte_size", "step")
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    byte_size: int
    step: int
    def __init__(self, byte_size: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("session_id", "key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    key: str
    def __init__(self, session_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedMemoryTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "byte_offset")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_offset: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., byte_offset: _Optional[int] = ...) -> None: ...

class StepSharedMemoryRequest(_message.Message):
    __slots__ = ("session_id", "step", "key", "gradients", "parameters", "hyperparameters", "metrics")
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    key: str
    gradients: _containers.RepeatedCompositeFieldContainer[SharedMemoryTensor]
    parameters: _containers.RepeatedCompositeFieldContainer[SharedMemoryTensor]
    hyperparameters: _containers.ScalarMap[str, float]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., key: _Optional[str] = ..., gradients: _Optional[_Iterable[_Union[SharedMemoryTensor, _Mapping]]] = ..., parameters: _Optional[_Iterable[_Union[SharedMemoryTensor, _Mapping]]] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StepSharedMemoryResponse(_message.Message):
    __slots__ = ("step", "replayed", "lr")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    step: int
    replayed: bool
    lr: float
    def __init__(self, step: _Optional[int] = ..., replayed: _Optional[bool] = ..., lr: _Optional[float] = ...) -> None: ...

class JoinSessionRequest(_message.Message):
    __slots__ = ("session_id", "worker")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker: str
    def __init__(self, session_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class JoinSessionResponse(_message.Message):
    __slots__ = ("session", "round")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    session: SessionInfo
    round: int
    def __init__(self, session: _Optional[_Union[SessionInfo, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class LeaveSessionRequest(_message.Message):
    __slots__ = ("session_id", "worker")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker: str
    def __init__(self, session_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class LeaveSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id", "worker")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker: str
    def __init__(self, session_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...
