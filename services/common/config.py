"""Settings of every service, read from environment variables (prefix FASHION_) with defaults.

Every field has a docstring; `fashion config` prints them all with their current values, and
README.md documents the same table. Defaults run the whole system on one machine with local
folders, SQLite and no external server.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal, TypeVar, get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fashion.defaults import DEFAULT_ADDRESSES

MIB = 1024 * 1024
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "inference" / "models" / "fashion-mnist"


RENAMED: dict[str, tuple[str, str]] = {}
"""Former environment variable of a renamed setting (deprecated, still read) -> (the setting, its
current variable)."""


def renamed_from(name: str, *former: str) -> AliasChoices:
    """The environment variables of the setting `name`, renamed from each of `former`: FASHION_<NAME>,
    else a former FASHION_<FORMER> (deprecated: still read, with a warning, when the current one is
    unset)."""
    current = f"FASHION_{name.upper()}"
    olds = [f"FASHION_{old.upper()}" for old in former]
    for old in olds:
        RENAMED[old] = (name, current)
    return AliasChoices(current, *olds)


_warned: set[str] = set()


def _warn_former_names(settings: BaseSettings) -> None:
    """A warning, once per process, for each former variable of `settings` the environment still sets."""
    present = {key.upper() for key in os.environ}
    for old, (name, current) in RENAMED.items():
        if old in present and name in type(settings).model_fields and old not in _warned:
            _warned.add(old)
            used = f"{current} is set and wins" if current in present else "still read"
            warnings.warn(f"{old} is deprecated ({used}): set {current} instead", FutureWarning, stacklevel=2)


class CommonSettings(BaseSettings):
    """What every service shares: logs, message limits, where the other services are."""

    model_config = SettingsConfigDict(env_prefix="FASHION_", extra="ignore", use_attribute_docstrings=True,
                                      populate_by_name=True)

    bind_address: str = "127.0.0.1"
    """Interface every listener of this process binds (gRPC, HTTP, metrics): loopback unless asked, so a
    default run is not open to the network; deployments (compose, Kubernetes) set 0.0.0.0."""
    log_dir: Path = Path("logs")
    """Folder of the rotating log files (api.log, api_errors.log, batch_*.log, ...); outside the data root
    (the Batch service refuses to start with its logs inside it)."""
    batch_max_age_hours: float = Field(default=26.0, gt=0, validation_alias=renamed_from(
        "batch_max_age_hours", "batch_stale_hours", "alert_batch_max_age_h"))
    """Batch processing is unhealthy, and No recent batch run fires, when the last run finished longer ago
    than this many hours (the Batch service judges batch health with it for every caller). Formerly
    FASHION_BATCH_STALE_HOURS and FASHION_ALERT_BATCH_MAX_AGE_H (deprecated, read when this one is unset)."""
    alert_success_rate_min: float = 95.0
    """High error rate fires, and batch health is degraded, when the API's or the batch success rate
    (percent) is under this."""
    alert_min_images: int = Field(default=20, ge=1)
    """Fewest images a window needs before its success rate or category mix is judged."""
    retention_days: float = Field(default=90.0, ge=0,
                                  validation_alias=renamed_from("retention_days", "report_keep_days"))
    """Per-run files older than this many days are deleted: batch logs (batch_<ts>.log,
    batch_runner_<ts>.log), CSV results and JSON summaries by the Batch service (hourly), the dashboard's
    reports and charts by the Monitor (when it writes a report); 0 keeps them all. Rotating service logs
    are bounded by rotation instead. Formerly FASHION_REPORT_KEEP_DAYS (the Monitor's; deprecated, read
    when this one is unset)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Lowest level written to the logs and stdout."""
    log_max_bytes: int = 10 * MIB
    """Size at which a log file rotates."""
    log_backup_count: int = 10
    """Rotated log files kept per log."""
    log_stdout: bool = True
    """Also write log lines to stdout."""
    log_files: bool = True
    """Write the rotating service logs (<name>.log, <name>_errors.log) under FASHION_LOG_DIR. Containers
    set false and log to stdout only (their platform collects it); per-run batch logs are still written."""
    log_format: Literal["text", "json"] = "text"
    """text: the monitoring guide's lines ([local time] LEVEL logger [trace_id=...] message); json: one
    object per line (time in UTC with milliseconds, level, logger, message, trace_id, span_id, service)."""
    max_message_bytes: int = 16 * MIB
    """Largest gRPC message accepted or sent, on servers and client channels."""
    inference_address: str = DEFAULT_ADDRESSES["inference"]
    """host:port of the Inference service, for the other services and the CLI."""
    batch_address: str = DEFAULT_ADDRESSES["batch"]
    """host:port of the Batch service."""
    monitor_address: str = DEFAULT_ADDRESSES["monitor"]
    """host:port of the Monitor service."""
    gateway_address: str = DEFAULT_ADDRESSES["gateway"]
    """host:port of the REST gateway, whose /health the Monitor and `fashion monitor health` check (the
    HTTP API is what the monitoring guide calls the API); empty: the gateway is not watched."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long in-flight calls may take to finish before the server exits."""
    # Security: the same variables configure a service's server side and its calls to the other
    # services (fashion.client.ChannelOptions.from_env reads them too).
    tls: bool = False
    """Clients (the CLI, the gateway, calls between services) reach the services over TLS."""
    tls_ca: Path | None = None
    """CA bundle that signed the services' certificates, trusted by clients; system roots when unset."""
    tls_cert: Path | None = None
    """PEM certificate (chain) of this process: servers serve TLS when it and tls_key are set; clients
    present it as their client certificate (mTLS)."""
    tls_key: Path | None = None
    """PEM private key of tls_cert."""
    tls_client_ca: Path | None = None
    """CA bundle of client certificates: when set, servers require and verify one (mutual TLS)."""
    tls_server_name: str = ""
    """Name clients expect in the services' certificates when it differs from the address's host."""
    health_port: int = 0
    """With TLS on, also serve grpc.health.v1 alone in plaintext on this port, for Kubernetes
    grpc probes (which cannot speak TLS); 0: off."""
    auth_token: SecretStr | None = None
    """Bearer token: servers refuse calls without it (UNAUTHENTICATED, HTTP 401; health and reflection
    excepted, metrics unless metrics_public) and clients send it. Unset with auth_token_file unset: no
    authentication."""
    auth_token_file: Path | None = None
    """File of bearer tokens (a mounted secret), one per line (`#` starts a comment line), used when
    auth_token is unset: servers accept any, clients send the first; followed as it changes."""
    metrics_public: bool = False
    """Serve /metrics without the bearer token even when one is set (by default scrapes must send it:
    Prometheus' `authorization: credentials_file`)."""
    reflection: bool = True
    """Serve gRPC server reflection (what `grpcurl list` reads); false hides the API description."""
    grpc_lb_policy: Literal["pick_first", "round_robin"] = "pick_first"
    """Client load balancing: round_robin spreads calls over every address a name resolves to (use it
    with a headless Kubernetes Service, e.g. dns:///fashion-inference-headless:50051)."""
    max_connection_age_s: float = 0.0
    """Servers close client connections older than this (in-flight calls finish), so clients re-resolve
    and spread over new replicas; 0: never."""

    def listen_host(self, host: str | None) -> str:
        """The interface a listener binds: its service's own setting, else bind_address (an IPv6
        literal without brackets: HTTP servers take the bare address)."""
        return (host or self.bind_address).strip("[]")

    def listen_address(self, host: str | None, port: int) -> str:
        """host:port of a listener (an IPv6 literal in brackets): what a gRPC server binds, and the
        authority of an HTTP listener's URL."""
        bare = self.listen_host(host)
        return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"

    @field_validator("bind_address")
    @classmethod
    def _an_interface(cls, value: str) -> str:
        # An empty host binds every interface: a blank value (`FASHION_BIND_ADDRESS=` in a .env file, a
        # variable expanding to nothing) must not quietly open the services to the network.
        if not value.strip():
            raise ValueError("must name an interface: 127.0.0.1 (this machine only), or 0.0.0.0 or :: (every "
                             "interface); empty would bind every interface")
        return value.strip()

    def model_post_init(self, context: object) -> None:
        _warn_former_names(self)


class InferenceSettings(CommonSettings):
    """The Inference service."""

    inference_host: str | None = None
    """Interface the Inference service listens on (gRPC and metrics); unset: bind_address."""
    inference_port: int = 50051
    """gRPC port of the Inference service (fashion.v1, KServe V2, health, reflection)."""
    inference_metrics_port: int = 9101
    """Prometheus /metrics port of the Inference service; 0 disables it."""
    model_dir: Path = SHIPPED_MODEL_DIR
    """Model folder: model.onnx plus manifest.json. Defaults to the shipped Fashion-MNIST model."""
    inference_processes: int = Field(default=0, ge=0, le=64)
    """Inference server processes sharing the one gRPC port (SO_REUSEPORT), each with its own batcher
    and worker processes, the cores split between them (0: from the core count: 1 on up to 2 cores,
    then one per core). With more than one, a parent process starts them, writes their logs,
    serves their metrics summed on the one metrics port, restarts one that dies (the replacement
    listens once its model is warm), and stops them all on SIGTERM; GetStats and ModelStatistics sum
    them and health says SERVING once all are warm (docs/architecture.md)."""
    max_batch_size: int = 256
    """Most images merged into one ONNX Runtime run by the dynamic batcher. A batch is only as big as
    what is waiting (max_delay_ms 0), so this bounds busy moments: there, fewer and bigger batches
    mean fewer hand-offs to the engine thread and the worker processes. Lower it when one run of
    this many images takes too long or too much memory (docs/performance.md has the measurements)."""
    max_delay_ms: float = 0.0
    """How long the oldest queued image may wait for a fuller batch (0: run when the engine is free)."""
    max_queue_size: int = 4096
    """Images waiting for the engine beyond which new calls get RESOURCE_EXHAUSTED (HTTP 429); one request
    of more images than this gets INVALID_ARGUMENT (HTTP 400), since waiting would never make it fit."""
    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads of each Inference server process (0: its share of the CPUs the
    service may use: its container's CPU limit rounded up, else the CPUs it may run on, else the
    machine's cores; all of them with one process)."""
    inter_op_threads: int = 1
    """ONNX Runtime inter-op threads."""
    worker_processes: int = Field(default=-1, ge=-1, le=64,
                                  validation_alias=renamed_from("worker_processes", "decode_processes"))
    """Worker processes that decode images, and on the CPU run the model, off the service's GIL (-1:
    one per batch in flight, 2, when the service may use 2 or more CPUs, counted as for
    intra_op_threads; 0: none, the service process decodes and runs the model itself). Formerly
    FASHION_DECODE_PROCESSES (deprecated, read when this one is unset)."""
    workers_run_model: bool = Field(default=True,
                                    validation_alias=renamed_from("workers_run_model", "helpers_run_model"))
    """On the CPU, the worker processes also run the model (a session each, the intra-op threads
    shared out between them): every batch, KServe tensors included, goes from the event loop to a
    worker and comes back as probabilities, and two batches run at once. False: the workers only
    decode and the model runs in the service process, as it always does on CUDA. Formerly
    FASHION_HELPERS_RUN_MODEL (deprecated, read when this one is unset)."""
    worker_nice: int = Field(default=10, ge=0, le=19, validation_alias=renamed_from("worker_nice", "helper_nice"))
    """How far below the service's CPU priority the worker processes run (an `os.nice` increment).
    The event loop is the one stage every call passes through; when it and a worker both want a
    core, the loop should have it, or every call waits. 0: the same priority as the service.
    Formerly FASHION_HELPER_NICE (deprecated, read when this one is unset)."""
    execution_provider: Literal["auto", "cuda", "cpu"] = "auto"
    """auto prefers CUDAExecutionProvider when onnxruntime-gpu and a GPU are present, else CPU."""
    max_image_pixels: int = 40_000_000
    """Images declaring more pixels than this are refused before decoding."""
    default_top_k: int = 3
    """Categories returned when a request does not say how many."""
    min_confidence: float | None = Field(default=None)
    """Confidence below which a result is marked uncertain; unset: the model manifest's value."""
    server_name: str = "fashion-inference"
    """Name reported by KServe ServerMetadata."""


class BatchSettings(CommonSettings):
    """The Batch service and `fashion batch run` (embedded): sorts folders of images into category folders."""

    batch_host: str | None = None
    """Interface the Batch service listens on (gRPC and metrics); unset: bind_address."""
    batch_port: int = 50052
    """gRPC port of the Batch service (fashion.v1.BatchService, health, reflection)."""
    batch_metrics_port: int = 9102
    """Prometheus /metrics port of the Batch service; 0 disables it."""
    data_root: Path = Path("data")
    """Every input and output folder of a job must lie under this folder; paths escaping it are refused."""
    results_dir: Path = Path("results")
    """CSV results and JSON summaries go to <results_dir>/batch_results/."""
    batch_db: Path | None = None
    """SQLite file of jobs and per-file state; unset: <data_root>/.batch/jobs.db. Not used when
    batch_database_url is set."""
    batch_database_url: SecretStr | None = None
    """PostgreSQL URL of the jobs database (postgresql://user:password@host:5432/database), which
    several Batch service replicas share; a secret, never logged. Unset
    (with batch_database_url_file unset): the SQLite file batch_db."""
    batch_database_url_file: Path | None = None
    """File holding that URL (a mounted secret), read at start; used when batch_database_url is unset."""
    batch_poll_interval_s: float = Field(default=5.0, gt=0)
    """How often the Batch service looks in the jobs database for work it was not handed: jobs
    submitted through another replica or left by a process that died, and (PostgreSQL) the files of
    a job another replica runs, which it helps with when it has nothing of its own to run."""
    batch_inbox: str = "inbox"
    """Folder (under data_root) that scheduled runs process."""
    batch_output_dir: str = "processed_batches"
    """Default folder (under data_root) of the category folders, _uncertain/ and _failed/."""
    batch_mode: Literal["move", "copy"] = "move"
    """Default transfer of sorted images: move (what the monitoring guide's batch script does) or copy."""
    batch_recursive: bool = False
    """Default for scheduled runs and the CLI: also process subfolders of the input folder."""
    batch_min_confidence: float | None = Field(default=None, ge=0, le=1)
    """Default confidence under which an image goes to _uncertain/; unset: the model's min_confidence."""
    batch_schedule: str = "0 2 * * *"
    """When the inbox is processed: a cron expression in local time ("0 2 * * *": nightly at 02:00, like
    the monitoring guide's batch script), or an interval ("every 30m", "90s", "2h"); empty disables scheduled runs."""
    batch_catch_up: bool = True
    """At start, run the inbox once if a scheduled run came due while the service was down (the last one
    only, and never on the first start of a schedule: some scheduled job must have run before)."""
    batch_chunk_size: int = Field(default=64, ge=1, le=1024)
    """Images sent to the Inference service in one ClassifyBatch call."""
    batch_chunk_bytes: int = Field(default=8 * MIB, ge=64 * 1024)
    """Most image bytes in one ClassifyBatch call (kept under max_message_bytes)."""
    batch_in_flight: int = Field(default=8, ge=1, le=64)
    """ClassifyBatch calls a job keeps in flight while it sorts the results of earlier ones."""
    batch_max_concurrent_jobs: int = Field(default=1, ge=1, le=16)
    """Jobs run at the same time by the Batch service; the others wait QUEUED."""
    batch_inference_timeout_s: float = Field(default=60.0, gt=0)
    """Deadline of one ClassifyBatch call."""
    batch_retry_initial_s: float = Field(default=1.0, gt=0)
    """First wait before retrying when the Inference service is unavailable; doubles per failure."""
    batch_retry_max_s: float = Field(default=30.0, gt=0)
    """Longest wait between two attempts to reach the Inference service."""
    batch_run_max_wait_s: float = Field(default=1800.0, ge=0)
    """How long `fashion batch run` waits for an Inference service that does not answer before it stops
    (exit 2; its job resumes when the same command runs again), so that a nightly cron run does not hang
    into the next one; 0: as long as it takes. Jobs of the Batch service wait as long as it takes."""
    batch_fsync: bool = True
    """fsync copied files and the folders of every move before recording them done (survives power loss)."""
    batch_csv_escape_formulas: bool = True
    """Write CSV cells that begin with =, +, -, @, tab or carriage return with a leading ' so that a
    spreadsheet shows a hostile file name as text instead of running it as a formula."""
    batch_min_file_age_s: float = Field(default=0.0, ge=0)
    """Images modified more recently than this are left for the next run (files still being uploaded)."""
    batch_history_days: int = Field(default=90, ge=1)
    """Per-file records of jobs older than this are deleted (job totals are kept)."""
    batch_shard_count: int = Field(default=1, ge=1, le=10_000)
    """Scale-out runs (`fashion batch run --shard-count`): split the images into this many shards by a
    stable hash of their path; this process sorts only its own shard."""
    batch_shard_index: int | None = Field(default=None, ge=0)
    """This process's shard, 0-based; unset: JOB_COMPLETION_INDEX (a Kubernetes Indexed Job), else 0."""

    @field_validator("batch_database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() and not _is_postgres_url(value.get_secret_value()):
            raise ValueError("must be a PostgreSQL URL: postgresql://user:password@host:5432/database")
        return value

    def batch_database_url_value(self) -> str:
        """The PostgreSQL URL of the jobs database, "" for SQLite. Raises ValueError (naming the setting,
        never the URL) when the file cannot be read or does not hold such a URL."""
        if self.batch_database_url is not None and self.batch_database_url.get_secret_value():
            return self.batch_database_url.get_secret_value()
        if self.batch_database_url_file is None:
            return ""
        try:
            url = self.batch_database_url_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"FASHION_BATCH_DATABASE_URL_FILE: cannot read {self.batch_database_url_file}: "
                             f"{exc.strerror}") from None
        if not _is_postgres_url(url):
            raise ValueError(f"FASHION_BATCH_DATABASE_URL_FILE: {self.batch_database_url_file} does not hold a "
                             "PostgreSQL URL (postgresql://user:password@host:5432/database)")
        return url


def _is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def _comma_list(value: object) -> object:
    """Lets list settings be written as "a,b,c" in the environment (JSON is not needed)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class MonitorSettings(CommonSettings):
    """The Monitor service: health checks, alert rules, notifications, dashboard."""

    monitor_host: str | None = None
    """Interface the Monitor service listens on (gRPC and metrics); unset: bind_address."""
    monitor_port: int = 50053
    """gRPC port of the Monitor service (fashion.v1.MonitorService, health, reflection)."""
    monitor_metrics_port: int = 9103
    """Prometheus /metrics port of the Monitor service; 0 disables it."""
    monitor_check_interval_s: float = Field(default=60.0, gt=0)
    """Seconds between two health checks and alert rule evaluations."""
    monitor_check_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of each health-check and statistics call to the other services."""
    monitor_state_db: Path = Path("data/monitor/monitor.db")
    """SQLite file of the alert state, alert history and pending notifications (survives restarts)."""
    report_dir: Path = Path("monitoring/reports")
    """Folder of the dashboard: report_<ts>.txt, chart PNGs and dashboard_<ts>.html."""
    report_chart_days: int = Field(default=30, ge=1, le=366)
    """Days shown by the dashboard charts."""
    report_cron: str = ""
    """When the Monitor writes the dashboard and emails the text report, as the monitoring guide's daily
    cron job does: a cron expression in local time ("0 9 * * *": daily at 09:00; a 6th field counts
    seconds); empty: never."""
    report_folders: Annotated[list[Path], NoDecode] = [Path("results/batch_results"), Path("logs"), Path("data")]
    """Comma-separated folders whose size the report lists and whose disks the disk-space rule watches."""
    alert_model_load_grace_s: float = Field(default=300.0, ge=0)
    """Model load failure fires at once when a load failed, and when the model is still loading after
    the Inference service has been up this long (a normal start is not an incident)."""
    alert_disk_free_min_percent: float = 10.0
    """Disk space low fires when a monitored disk has less free space than this (percent)."""
    alert_response_time_max_s: float = 5.0
    """High response time fires when the API's average latency over the window exceeds this (seconds)."""
    alert_api_window_s: float = Field(default=900.0, gt=0)
    """Window of the API success rate and average latency the rules judge (seconds)."""
    alert_drift_tvd_max: float = Field(default=0.25, ge=0, le=1)
    """Drift fires when the last day's category distribution is further than this (total variation
    distance, 0..1) from the previous 7 days'."""
    alert_drift_confidence_drop_max: float = Field(default=0.10, ge=0, le=1)
    """Drift also fires when the last day's mean confidence is lower than the previous 7 days' by more."""
    alert_cooldown_s: float = Field(default=1800.0, ge=0)
    """Least time between two fired notifications of one rule; a new incident inside it is sent when it ends."""
    alert_confirm_checks: int = Field(default=2, ge=1)
    """Consecutive checks a condition must hold before its alert fires (filters one-off blips)."""
    alert_disabled_rules: Annotated[list[str], NoDecode] = []
    """Comma-separated rule names that are not evaluated (see `fashion monitor alerts --rules`)."""
    alert_severity: Annotated[dict[str, Literal["INFO", "WARNING", "ERROR", "CRITICAL"]], NoDecode] = {}
    """Severity overrides as rule=SEVERITY pairs, comma-separated, e.g. "disk_space_low=CRITICAL"."""
    smtp_host: str = ""
    """SMTP server of alert emails; empty disables email."""
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    """SMTP port; unset: 465 when FASHION_SMTP_SSL=true (implicit TLS), else 587 (STARTTLS); 25 for plain SMTP."""
    smtp_starttls: bool = True
    """Upgrade the SMTP connection with STARTTLS before logging in."""
    smtp_ssl: bool = False
    """Implicit TLS from the first byte (SMTPS, port 465) instead of STARTTLS."""
    smtp_ca_file: Path | None = None
    """CA bundle that signed the SMTP server's certificate; system roots when unset."""
    smtp_user: str = ""
    """SMTP login; empty: no login."""
    smtp_allow_plaintext_auth: bool = False
    """Log in (send the password) over a connection without TLS; by default a login needs STARTTLS or
    implicit TLS, and the Monitor refuses to start otherwise."""
    smtp_password: SecretStr | None = None
    """SMTP password (FASHION_SMTP_PASSWORD); never logged."""
    smtp_password_file: Path | None = None
    """File holding the SMTP password (a mounted secret); read at each send, used when smtp_password is unset."""
    smtp_from: str = "fashion-monitor@localhost"
    """From address of alert emails."""
    smtp_to: Annotated[list[str], NoDecode] = []
    """Comma-separated recipients of alert emails."""
    slack_webhook_url: SecretStr | None = None
    """Slack incoming-webhook URL (FASHION_SLACK_WEBHOOK_URL); a secret, never logged. Unset disables Slack."""
    slack_webhook_url_file: Path | None = None
    """File holding the Slack webhook URL, used when slack_webhook_url is unset."""
    slack_username: str = "Fashion Classifier Bot"
    """Name the Slack messages are posted under."""
    slack_icon_emoji: str = ":robot_face:"
    """Icon of the Slack messages."""
    notify_timeout_s: float = Field(default=10.0, gt=0)
    """Deadline of one email or webhook delivery."""
    notify_retry_initial_s: float = Field(default=5.0, gt=0)
    """Wait before retrying a failed notification; doubles per failure up to notify_retry_max_s."""
    notify_retry_max_s: float = Field(default=300.0, gt=0)
    """Longest wait between two delivery attempts."""
    notify_give_up_h: float = Field(default=24.0, gt=0)
    """A notification still undelivered after this many hours is dropped (logged as an error)."""

    @field_validator("report_cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from croniter import croniter

        if value.strip() and not croniter.is_valid(value.strip()):
            raise ValueError(f"not a cron expression: {value!r} (e.g. \"0 9 * * *\" for daily at 09:00)")
        return value.strip()

    @field_validator("report_folders", "alert_disabled_rules", "smtp_to", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("alert_severity", mode="before")
    @classmethod
    def _split_pairs(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in _comma_list(value)]  # type: ignore[union-attr]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"expected rule=SEVERITY pairs, got {value!r}")
            return {rule.strip(): level.strip().upper() for rule, level in pairs}
        return value


class GatewaySettings(CommonSettings):
    """The REST gateway: HTTP/JSON in front of the gRPC services, with no logic of its own."""

    gateway_host: str | None = None
    """Interface the gateway listens on; unset: bind_address."""
    gateway_port: int = 8080
    """HTTP port of the gateway (/predict, /health, /stats, /batch/jobs, /monitor, /metrics, /docs)."""
    gateway_workers: int = Field(default=1, ge=1, le=64)
    """uvicorn worker processes on the one port, each with its own gRPC channels; /metrics, whichever worker
    answers, sums every worker's counters."""
    gateway_timeout_s: float = Field(default=30.0, gt=0)
    """Deadline of each gRPC call the gateway makes (HTTP 504 when it passes)."""
    gateway_classify_calls: int = Field(default=3, ge=0, le=64)
    """POST /predict requests that arrive together go to the Inference service together, as
    ClassifyBatch calls, at most this many at a time (raise it with several Inference replicas);
    while calls are out, another starts once 8 requests wait. 0: one Classify call per request.
    Requests carrying a traceparent always get their own call."""
    max_upload_bytes: int = Field(default=10 * MIB, ge=1024)
    """Largest request body of POST /predict (one image); larger: HTTP 413 before the body is read."""
    max_batch_upload_bytes: int = Field(default=15 * MIB, ge=1024)
    """Largest request body of POST /predict/batch and of the Open Inference Protocol's POST
    /v2/models/{name}/infer (after decompression); keep it under max_message_bytes."""
    max_batch_files: int = Field(default=256, ge=1)
    """Most images in one POST /predict/batch."""
    gateway_max_concurrency: int = Field(default=0, ge=0)
    """Requests handled at once beyond which new ones get HTTP 503 (0: no limit)."""
    gateway_cors_origins: Annotated[list[str], NoDecode] = []
    """Comma-separated origins browsers may call the gateway from (CORS); empty: none."""

    @field_validator("gateway_cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return _comma_list(value)


S = TypeVar("S", bound=BaseSettings)


def invalid_settings_message(exc: ValidationError) -> str:
    """One line per unusable FASHION_* value, naming the variable, what it holds and why it is refused."""
    lines = []
    for error in exc.errors():
        variable = _variable_of(str(error["loc"][0])) if error["loc"] else "FASHION_*"
        value = error.get("input")
        secret = str(error["loc"][0]).lower().removeprefix("fashion_") in _secret_fields() if error["loc"] else False
        shown = f"={value!r}" if isinstance(value, str | int | float) and not secret else ""
        lines.append(f"error: {variable}{shown}: {error['msg']}")
    return "\n".join(lines)


def _secret_fields() -> set[str]:
    """The settings that hold secrets (SecretStr): an error never shows their value."""
    classes = [c for c in globals().values() if isinstance(c, type) and issubclass(c, CommonSettings)]
    return {name for cls in classes for name, field in cls.model_fields.items()
            if SecretStr in (field.annotation, *get_args(field.annotation))}


def _variable_of(location: str) -> str:
    """The environment variable a validation error's location stands for: FASHION_<field>, a renamed
    setting's current variable, or its former one when only that is set."""
    variable = location.upper() if location.upper().startswith("FASHION_") else f"FASHION_{location.upper()}"
    present = {key.upper() for key in os.environ}
    if variable not in present:
        variable = next((old for old, (_, current) in RENAMED.items() if current == variable and old in present),
                        variable)
    return variable


def load_settings(settings_class: type[S], **overrides: object) -> S:
    """The settings of a process's entry point (with the caller's overrides); unusable values end it with
    exit code 2 and one line per problem on stderr (no traceback)."""
    try:
        return settings_class(**overrides)
    except ValidationError as exc:
        print(invalid_settings_message(exc), file=sys.stderr)
        raise SystemExit(2) from None


def settings_rows() -> list[tuple[str, str, str]]:
    """Every setting once, as (environment variable, current value, description): `fashion config`."""
    classes = [c for c in globals().values() if isinstance(c, type) and issubclass(c, CommonSettings)]
    seen: set[str] = set()
    rows = []
    for cls in sorted(classes, key=lambda c: (c is not CommonSettings, c.__name__)):
        settings = load_settings(cls)
        for name, field in cls.model_fields.items():
            if name not in seen:
                seen.add(name)
                rows.append((f"FASHION_{name.upper()}", str(getattr(settings, name)), field.description or ""))
    return rows
