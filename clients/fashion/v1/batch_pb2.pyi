import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from fashion.v1 import health_pb2 as _health_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSFER_MODE_UNSPECIFIED: _ClassVar[TransferMode]
    TRANSFER_MODE_MOVE: _ClassVar[TransferMode]
    TRANSFER_MODE_COPY: _ClassVar[TransferMode]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_WAITING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
TRANSFER_MODE_UNSPECIFIED: TransferMode
TRANSFER_MODE_MOVE: TransferMode
TRANSFER_MODE_COPY: TransferMode
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_WAITING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class SubmitJobRequest(_message.Message):
    __slots__ = ("input_dir", "mode", "min_confidence", "recursive", "output_dir", "idempotency_key")
    INPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    input_dir: str
    mode: TransferMode
    min_confidence: float
    recursive: bool
    output_dir: str
    idempotency_key: str
    def __init__(self, input_dir: _Optional[str] = ..., mode: _Optional[_Union[TransferMode, str]] = ..., min_confidence: _Optional[float] = ..., recursive: _Optional[bool] = ..., output_dir: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "input_dir", "output_dir", "mode", "min_confidence", "recursive", "trigger", "created_at", "started_at", "finished_at", "total", "processed", "successful", "failed", "uncertain", "skipped", "categories", "results_csv", "summary_json", "log_file", "error", "duration_seconds")
    class CategoriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    RECURSIVE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_FIELD_NUMBER: _ClassVar[int]
    SUCCESSFUL_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_CSV_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    LOG_FILE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    input_dir: str
    output_dir: str
    mode: TransferMode
    min_confidence: float
    recursive: bool
    trigger: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    total: int
    processed: int
    successful: int
    failed: int
    uncertain: int
    skipped: int
    categories: _containers.ScalarMap[str, int]
    results_csv: str
    summary_json: str
    log_file: str
    error: str
    duration_seconds: float
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., input_dir: _Optional[str] = ..., output_dir: _Optional[str] = ..., mode: _Optional[_Union[TransferMode, str]] = ..., min_confidence: _Optional[float] = ..., recursive: _Optional[bool] = ..., trigger: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., total: _Optional[int] = ..., processed: _Optional[int] = ..., successful: _Optional[int] = ..., failed: _Optional[int] = ..., uncertain: _Optional[int] = ..., skipped: _Optional[int] = ..., categories: _Optional[_Mapping[str, int]] = ..., results_csv: _Optional[str] = ..., summary_json: _Optional[str] = ..., log_file: _Optional[str] = ..., error: _Optional[str] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class FileResult(_message.Message):
    __slots__ = ("filename", "category", "confidence", "status", "destination", "error")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    filename: str
    category: str
    confidence: float
    status: str
    destination: str
    error: str
    def __init__(self, filename: _Optional[str] = ..., category: _Optional[str] = ..., confidence: _Optional[float] = ..., status: _Optional[str] = ..., destination: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "message", "files")
    JOB_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    job: Job
    message: str
    files: _containers.RepeatedCompositeFieldContainer[FileResult]
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., message: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileResult, _Mapping]]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("limit", "state")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    limit: int
    state: JobState
    def __init__(self, limit: _Optional[int] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetBatchStatsRequest(_message.Message):
    __slots__ = ("days",)
    DAYS_FIELD_NUMBER: _ClassVar[int]
    days: int
    def __init__(self, days: _Optional[int] = ...) -> None: ...

class CategoryCount(_message.Message):
    __slots__ = ("category", "count")
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    category: str
    count: int
    def __init__(self, category: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class DailyBatchStats(_message.Message):
    __slots__ = ("date", "runs", "images", "successful", "failed", "uncertain", "categories", "mean_confidence", "success_rate")
    DATE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SUCCESSFUL_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    MEAN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    date: str
    runs: int
    images: int
    successful: int
    failed: int
    uncertain: int
    categories: _containers.RepeatedCompositeFieldContainer[CategoryCount]
    mean_confidence: float
    success_rate: float
    def __init__(self, date: _Optional[str] = ..., runs: _Optional[int] = ..., images: _Optional[int] = ..., successful: _Optional[int] = ..., failed: _Optional[int] = ..., uncertain: _Optional[int] = ..., categories: _Optional[_Iterable[_Union[CategoryCount, _Mapping]]] = ..., mean_confidence: _Optional[float] = ..., success_rate: _Optional[float] = ...) -> None: ...

class BatchStats(_message.Message):
    __slots__ = ("days", "last_run_at", "last_run_age_hours", "runs", "images", "successful", "failed", "uncertain", "success_rate", "top_categories", "daily", "recent_errors", "active_jobs", "data_root", "data_total_bytes", "data_free_bytes")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_RUN_AGE_HOURS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SUCCESSFUL_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    UNCERTAIN_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    TOP_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DAILY_FIELD_NUMBER: _ClassVar[int]
    RECENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_JOBS_FIELD_NUMBER: _ClassVar[int]
    DATA_ROOT_FIELD_NUMBER: _ClassVar[int]
    DATA_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    days: int
    last_run_at: _timestamp_pb2.Timestamp
    last_run_age_hours: float
    runs: int
    images: int
    successful: int
    failed: int
    uncertain: int
    success_rate: float
    top_categories: _containers.RepeatedCompositeFieldContainer[CategoryCount]
    daily: _containers.RepeatedCompositeFieldContainer[DailyBatchStats]
    recent_errors: _containers.RepeatedScalarFieldContainer[str]
    active_jobs: int
    data_root: str
    data_total_bytes: int
    data_free_bytes: int
    def __init__(self, days: _Optional[int] = ..., last_run_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_run_age_hours: _Optional[float] = ..., runs: _Optional[int] = ..., images: _Optional[int] = ..., successful: _Optional[int] = ..., failed: _Optional[int] = ..., uncertain: _Optional[int] = ..., success_rate: _Optional[float] = ..., top_categories: _Optional[_Iterable[_Union[CategoryCount, _Mapping]]] = ..., daily: _Optional[_Iterable[_Union[DailyBatchStats, _Mapping]]] = ..., recent_errors: _Optional[_Iterable[str]] = ..., active_jobs: _Optional[int] = ..., data_root: _Optional[str] = ..., data_total_bytes: _Optional[int] = ..., data_free_bytes: _Optional[int] = ...) -> None: ...

class GetBatchHealthRequest(_message.Message):
    __slots__ = ("days", "max_age_hours")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_HOURS_FIELD_NUMBER: _ClassVar[int]
    days: int
    max_age_hours: float
    def __init__(self, days: _Optional[int] = ..., max_age_hours: _Optional[float] = ...) -> None: ...

class BatchHealth(_message.Message):
    __slots__ = ("status", "message", "recent_run", "max_age_hours", "recent_errors", "stats", "success_rate_min", "checked_at", "failed_job")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECENT_RUN_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_HOURS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ERRORS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_MIN_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    FAILED_JOB_FIELD_NUMBER: _ClassVar[int]
    status: _health_pb2.HealthStatus
    message: str
    recent_run: bool
    max_age_hours: float
    recent_errors: _containers.RepeatedScalarFieldContainer[str]
    stats: BatchStats
    success_rate_min: float
    checked_at: _timestamp_pb2.Timestamp
    failed_job: Job
    def __init__(self, status: _Optional[_Union[_health_pb2.HealthStatus, str]] = ..., message: _Optional[str] = ..., recent_run: _Optional[bool] = ..., max_age_hours: _Optional[float] = ..., recent_errors: _Optional[_Iterable[str]] = ..., stats: _Optional[_Union[BatchStats, _Mapping]] = ..., success_rate_min: _Optional[float] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failed_job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...
