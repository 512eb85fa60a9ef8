from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "top_k", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    top_k: int
    request_id: str
    def __init__(self, image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class Category(_message.Message):
    __slots__ = ("label", "index", "confidence")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    confidence: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., confidence: _Optional[float] = ...) -> None: ...

class ImageError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("category", "confidence", "top_k", "uncertain", "model_name", "model_version", "latency_ms", "request_id", "error")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    category: str
    confidence: float
    top_k: _containers.RepeatedCompositeFieldContainer[Category]
    uncertain: bool
    model_name: str
    model_version: str
    latency_ms: float
    request_id: str
    error: ImageError
    def __init__(self, category: _Optional[str] = ..., confidence: _Optional[float] = ..., top_k: _Optional[_Iterable[_Union[Category, _Mapping]]] = ..., uncertain: _Optional[bool] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., latency_ms: _Optional[float] = ..., request_id: _Optional[str] = ..., error: _Optional[_Union[ImageError, _Mapping]] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("images", "top_k", "requests")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    top_k: int
    requests: int
    def __init__(self, images: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ..., top_k: _Optional[int] = ..., requests: _Optional[int] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("results", "model_name", "model_version", "latency_ms")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyResponse]
    model_name: str
    model_version: str
    latency_ms: float
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyResponse, _Mapping]]] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: str
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "labels", "input", "output", "color_mode", "background", "execution_provider", "max_batch_size", "min_confidence", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COLOR_MODE_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input: TensorSpec
    output: TensorSpec
    color_mode: str
    background: str
    execution_provider: str
    max_batch_size: int
    min_confidence: float
    description: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input: _Optional[_Union[TensorSpec, _Mapping]] = ..., output: _Optional[_Union[TensorSpec, _Mapping]] = ..., color_mode: _Optional[str] = ..., background: _Optional[str] = ..., execution_provider: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., min_confidence: _Optional[float] = ..., description: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Stats(_message.Message):
    __slots__ = ("uptime_seconds", "uptime_human", "total_requests", "total_images_processed", "successful_predictions", "failed_predictions", "success_rate", "model_loaded", "timestamp", "average_latency_ms", "model_name", "model_version", "classes", "model_error", "instance_id")
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_HUMAN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_IMAGES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    SUCCESSFUL_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    FAILED_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ERROR_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    uptime_seconds: int
    uptime_human: str
    total_requests: int
    total_images_processed: int
    successful_predictions: int
    failed_predictions: int
    success_rate: float
    model_loaded: bool
    timestamp: str
    average_latency_ms: float
    model_name: str
    model_version: str
    classes: int
    model_error: str
    instance_id: str
    def __init__(self, uptime_seconds: _Optional[int] = ..., uptime_human: _Optional[str] = ..., total_requests: _Optional[int] = ..., total_images_processed: _Optional[int] = ..., successful_predictions: _Optional[int] = ..., failed_predictions: _Optional[int] = ..., success_rate: _Optional[float] = ..., model_loaded: _Optional[bool] = ..., timestamp: _Optional[str] = ..., average_latency_ms: _Optional[float] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., classes: _Optional[int] = ..., model_error: _Optional[str] = ..., instance_id: _Optional[str] = ...) -> None: ...
