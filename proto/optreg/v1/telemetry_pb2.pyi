from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportTelemetryRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportTelemetryResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ImportTelemetryRequest(_message.Message):
    __slots__ = ("session_id", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportTelemetryResponse(_message.Message):
    __slots__ = ("last_step",)
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    last_step: int
    def __init__(self, last_step: _Optional[int] = ...) -> None: ...

class WatchSessionRequest(_message.Message):
    __slots__ = ("session_id", "from_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_step: int
    def __init__(self, session_id: _Optional[str] = ..., from_step: _Optional[int] = ...) -> None: ...

class WatchSessionResponse(_message.Message):
    __slots__ = ("step", "alert")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ALERT_FIELD_NUMBER: _ClassVar[int]
    step: StepTelemetry
    alert: Alert
    def __init__(self, step: _Optional[_Union[StepTelemetry, _Mapping]] = ..., alert: _Optional[_Union[Alert, _Mapping]] = ...) -> None: ...

class GetTelemetryRequest(_message.Message):
    __slots__ = ("session_id", "from_step", "to_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_step: int
    to_step: int
    def __init__(self, session_id: _Optional[str] = ..., from_step: _Optional[int] = ..., to_step: _Optional[int] = ...) -> None: ...

class GetTelemetryResponse(_message.Message):
    __slots__ = ("steps", "alerts", "first_step", "last_step", "full_resolution_from")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    FULL_RESOLUTION_FROM_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepTelemetry]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    first_step: int
    last_step: int
    full_resolution_from: int
    def __init__(self, steps: _Optional[_Iterable[_Union[StepTelemetry, _Mapping]]] = ..., alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., first_step: _Optional[int] = ..., last_step: _Optional[int] = ..., full_resolution_from: _Optional[int] = ...) -> None: ...

class StepTelemetry(_message.Message):
    __slots__ = ("step", "steps", "wall_time", "tensors", "metrics", "hyperparameters")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class HyperparametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps: int
    wall_time: float
    tensors: _containers.RepeatedCompositeFieldContainer[TensorTelemetry]
    metrics: _containers.ScalarMap[str, float]
    hyperparameters: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., steps: _Optional[int] = ..., wall_time: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[TensorTelemetry, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., hyperparameters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class TensorTelemetry(_message.Message):
    __slots__ = ("name", "grad_norm", "param_norm", "update_norm", "update_ratio", "grad_max_abs", "effective_lr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PARAM_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RATIO_FIELD_NUMBER: _ClassVar[int]
    GRAD_MAX_ABS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LR_FIELD_NUMBER: _ClassVar[int]
    name: str
    grad_norm: float
    param_norm: float
    update_norm: float
    update_ratio: float
    grad_max_abs: float
    effective_lr: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., grad_norm: _Optional[float] = ..., param_norm: _Optional[float] = ..., update_norm: _Optional[float] = ..., update_ratio: _Optional[float] = ..., grad_max_abs: _Optional[float] = ..., effective_lr: _Optional[_Iterable[float]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("kind", "step", "wall_time", "tensor", "message")
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    step: int
    wall_time: float
    tensor: str
    message: str
    def __init__(self, kind: _Optional[str] = ..., step: _Optional[int] = ..., wall_time: _Optional[float] = ..., tensor: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
