import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from fashion.v1 import batch_pb2 as _batch_pb2
from fashion.v1 import health_pb2 as _health_pb2
from fashion.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_ERROR: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_STATE_FIRING: _ClassVar[AlertState]
    ALERT_STATE_RESOLVED: _ClassVar[AlertState]
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_ERROR: Severity
SEVERITY_CRITICAL: Severity
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_STATE_FIRING: AlertState
ALERT_STATE_RESOLVED: AlertState

class GetSystemHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceHealth(_message.Message):
    __slots__ = ("name", "address", "status", "serving_status", "message", "latency_ms", "checked_at", "inference_stats", "batch_stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SERVING_STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_STATS_FIELD_NUMBER: _ClassVar[int]
    BATCH_STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    status: _health_pb2.HealthStatus
    serving_status: str
    message: str
    latency_ms: float
    checked_at: _timestamp_pb2.Timestamp
    inference_stats: _inference_pb2.Stats
    batch_stats: _batch_pb2.BatchStats
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[_Union[_health_pb2.HealthStatus, str]] = ..., serving_status: _Optional[str] = ..., message: _Optional[str] = ..., latency_ms: _Optional[float] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., inference_stats: _Optional[_Union[_inference_pb2.Stats, _Mapping]] = ..., batch_stats: _Optional[_Union[_batch_pb2.BatchStats, _Mapping]] = ...) -> None: ...

class DiskSpace(_message.Message):
    __slots__ = ("path", "total_bytes", "free_bytes", "free_percent", "folder_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    FOLDER_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    total_bytes: int
    free_bytes: int
    free_percent: float
    folder_bytes: int
    def __init__(self, path: _Optional[str] = ..., total_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., free_percent: _Optional[float] = ..., folder_bytes: _Optional[int] = ...) -> None: ...

class SystemHealth(_message.Message):
    __slots__ = ("status", "services", "disks", "checked_at", "active_alerts")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    DISKS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ALERTS_FIELD_NUMBER: _ClassVar[int]
    status: _health_pb2.HealthStatus
    services: _containers.RepeatedCompositeFieldContainer[ServiceHealth]
    disks: _containers.RepeatedCompositeFieldContainer[DiskSpace]
    checked_at: _timestamp_pb2.Timestamp
    active_alerts: int
    def __init__(self, status: _Optional[_Union[_health_pb2.HealthStatus, str]] = ..., services: _Optional[_Iterable[_Union[ServiceHealth, _Mapping]]] = ..., disks: _Optional[_Iterable[_Union[DiskSpace, _Mapping]]] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_alerts: _Optional[int] = ...) -> None: ...

class GenerateReportRequest(_message.Message):
    __slots__ = ("chart_days", "text_only")
    CHART_DAYS_FIELD_NUMBER: _ClassVar[int]
    TEXT_ONLY_FIELD_NUMBER: _ClassVar[int]
    chart_days: int
    text_only: bool
    def __init__(self, chart_days: _Optional[int] = ..., text_only: _Optional[bool] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("text_path", "html_path", "chart_paths", "text", "status", "generated_at")
    TEXT_PATH_FIELD_NUMBER: _ClassVar[int]
    HTML_PATH_FIELD_NUMBER: _ClassVar[int]
    CHART_PATHS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    text_path: str
    html_path: str
    chart_paths: _containers.RepeatedScalarFieldContainer[str]
    text: str
    status: _health_pb2.HealthStatus
    generated_at: _timestamp_pb2.Timestamp
    def __init__(self, text_path: _Optional[str] = ..., html_path: _Optional[str] = ..., chart_paths: _Optional[_Iterable[str]] = ..., text: _Optional[str] = ..., status: _Optional[_Union[_health_pb2.HealthStatus, str]] = ..., generated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("rule", "title", "severity", "state", "message", "value", "threshold", "started_at", "updated_at", "resolved_at", "notified")
    RULE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    rule: str
    title: str
    severity: Severity
    state: AlertState
    message: str
    value: float
    threshold: float
    started_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    resolved_at: _timestamp_pb2.Timestamp
    notified: bool
    def __init__(self, rule: _Optional[str] = ..., title: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., state: _Optional[_Union[AlertState, str]] = ..., message: _Optional[str] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., notified: _Optional[bool] = ...) -> None: ...

class AlertEvent(_message.Message):
    __slots__ = ("rule", "title", "severity", "kind", "message", "at", "notified")
    RULE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    NOTIFIED_FIELD_NUMBER: _ClassVar[int]
    rule: str
    title: str
    severity: Severity
    kind: str
    message: str
    at: _timestamp_pb2.Timestamp
    notified: bool
    def __init__(self, rule: _Optional[str] = ..., title: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., notified: _Optional[bool] = ...) -> None: ...

class AlertRuleInfo(_message.Message):
    __slots__ = ("rule", "title", "severity", "condition", "enabled")
    RULE_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    rule: str
    title: str
    severity: Severity
    condition: str
    enabled: bool
    def __init__(self, rule: _Optional[str] = ..., title: _Optional[str] = ..., severity: _Optional[_Union[Severity, str]] = ..., condition: _Optional[str] = ..., enabled: _Optional[bool] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("history_limit", "rule")
    HISTORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    history_limit: int
    rule: str
    def __init__(self, history_limit: _Optional[int] = ..., rule: _Optional[str] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("active", "history", "rules", "pending_notifications")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    PENDING_NOTIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    active: _containers.RepeatedCompositeFieldContainer[Alert]
    history: _containers.RepeatedCompositeFieldContainer[AlertEvent]
    rules: _containers.RepeatedCompositeFieldContainer[AlertRuleInfo]
    pending_notifications: int
    def __init__(self, active: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[AlertEvent, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[AlertRuleInfo, _Mapping]]] = ..., pending_notifications: _Optional[int] = ...) -> None: ...

class SendTestAlertRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class NotificationResult(_message.Message):
    __slots__ = ("channel", "destination", "delivered", "error")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    channel: str
    destination: str
    delivered: bool
    error: str
    def __init__(self, channel: _Optional[str] = ..., destination: _Optional[str] = ..., delivered: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class SendTestAlertResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NotificationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[NotificationResult, _Mapping]]] = ...) -> None: ...
