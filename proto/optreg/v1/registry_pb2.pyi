from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HyperparameterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HYPERPARAMETER_TYPE_UNSPECIFIED: _ClassVar[HyperparameterType]
    HYPERPARAMETER_TYPE_FLOAT: _ClassVar[HyperparameterType]
    HYPERPARAMETER_TYPE_INT: _ClassVar[HyperparameterType]
    HYPERPARAMETER_TYPE_BOOL: _ClassVar[HyperparameterType]
HYPERPARAMETER_TYPE_UNSPECIFIED: HyperparameterType
HYPERPARAMETER_TYPE_FLOAT: HyperparameterType
HYPERPARAMETER_TYPE_INT: HyperparameterType
HYPERPARAMETER_TYPE_BOOL: HyperparameterType

class HyperparameterSpec(_message.Message):
    __slots__ = ("name", "type", "default", "minimum", "maximum", "minimum_exclusive", "maximum_exclusive", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: HyperparameterType
    default: float
    minimum: float
    maximum: float
    minimum_exclusive: bool
    maximum_exclusive: bool
    doc: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[HyperparameterType, str]] = ..., default: _Optional[float] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., minimum_exclusive: _Optional[bool] = ..., maximum_exclusive: _Optional[bool] = ..., doc: _Optional[str] = ...) -> None: ...

class StateSlotSpec(_message.Message):
    __slots__ = ("name", "initial_value", "shape", "dtype", "domain")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INITIAL_VALUE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    initial_value: float
    shape: str
    dtype: str
    domain: str
    def __init__(self, name: _Optional[str] = ..., initial_value: _Optional[float] = ..., shape: _Optional[str] = ..., dtype: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class OptimizerInfo(_message.Message):
    __slots__ = ("name", "summary", "hyperparameters", "slots", "elementwise", "sparse_rows", "plugin", "distribution", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ELEMENTWISE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_ROWS_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    hyperparameters: _containers.RepeatedCompositeFieldContainer[HyperparameterSpec]
    slots: _containers.RepeatedCompositeFieldContainer[StateSlotSpec]
    elementwise: bool
    sparse_rows: bool
    plugin: str
    distribution: str
    version: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., hyperparameters: _Optional[_Iterable[_Union[HyperparameterSpec, _Mapping]]] = ..., slots: _Optional[_Iterable[_Union[StateSlotSpec, _Mapping]]] = ..., elementwise: _Optional[bool] = ..., sparse_rows: _Optional[bool] = ..., plugin: _Optional[str] = ..., distribution: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PluginFailure(_message.Message):
    __slots__ = ("plugin", "reason")
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    plugin: str
    reason: str
    def __init__(self, plugin: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListOptimizersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScheduleInfo(_message.Message):
    __slots__ = ("name", "summary", "parameters", "required", "plugin", "distribution", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    summary: str
    parameters: _containers.RepeatedCompositeFieldContainer[HyperparameterSpec]
    required: _containers.RepeatedScalarFieldContainer[str]
    plugin: str
    distribution: str
    version: str
    def __init__(self, name: _Optional[str] = ..., summary: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[HyperparameterSpec, _Mapping]]] = ..., required: _Optional[_Iterable[str]] = ..., plugin: _Optional[str] = ..., distribution: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ListOptimizersResponse(_message.Message):
    __slots__ = ("optimizers", "failures", "schedules")
    OPTIMIZERS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    SCHEDULES_FIELD_NUMBER: _ClassVar[int]
    optimizers: _containers.RepeatedCompositeFieldContainer[OptimizerInfo]
    failures: _containers.RepeatedCompositeFieldContainer[PluginFailure]
    schedules: _containers.RepeatedCompositeFieldContainer[ScheduleInfo]
    def __init__(self, optimizers: _Optional[_Iterable[_Union[OptimizerInfo, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[PluginFailure, _Mapping]]] = ..., schedules: _Optional[_Iterable[_Union[ScheduleInfo, _Mapping]]] = ...) -> None: ...
