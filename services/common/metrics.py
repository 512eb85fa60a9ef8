"""Prometheus metrics of every service, in one registry (prometheus-client's default).

With several processes behind one service (FASHION_INFERENCE_PROCESSES), prometheus-client's
multiprocess mode sums them: PROMETHEUS_MULTIPROC_DIR is set in each child's environment before it
imports prometheus-client, and the parent serves a MultiProcessCollector registry on the one
metrics port (`start_metrics_server(registry=...)`); the gauges say how processes combine
(multiprocess_mode: in-flight and queue depth summed over live processes, model loaded their minimum).

Each service process exposes them on its own HTTP port (see README), on the service's bind
address, and behind its bearer token when one is set (unless FASHION_METRICS_PUBLIC=true); over TLS
(HTTPS, client certificates required with FASHION_TLS_CLIENT_CA) when the process serves TLS, with the
certificate its gRPC port shows, renewed alike (security.metrics_tls); names
follow Prometheus conventions, and queue time is kept apart from compute time, as Triton does.

Every family is defined here, but a process exposes only its own (`expose(service)`): a Batch
service's port shows no Inference families at zero to mislead a dashboard.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# --- every gRPC service --------------------------------------------------------------------
GRPC_REQUESTS = Counter(
    "fashion_grpc_requests", "gRPC calls handled, by service, method and status code",
    ["service", "method", "code"],
)
GRPC_LATENCY = Histogram(
    "fashion_grpc_request_duration_seconds", "Server-side gRPC call duration",
    ["service", "method"], buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("fashion_grpc_requests_in_flight", "gRPC calls being handled", ["service"],
                       multiprocess_mode="livesum")

# --- Inference service ---------------------------------------------------------------------
IMAGES_PROCESSED = Counter(
    "fashion_inference_images", "Images classified, by outcome (success, failed)", ["outcome"],
)
BATCH_SIZE = Histogram(
    "fashion_inference_batch_size", "Images per ONNX Runtime run (dynamic batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_DEPTH = Gauge("fashion_inference_queue_depth", "Images waiting for the engine", multiprocess_mode="livesum")
QUEUE_DURATION = Histogram(
    "fashion_inference_queue_duration_seconds", "Time an image waited for its batch to start",
    buckets=LATENCY_BUCKETS,
)
COMPUTE_DURATION = Histogram(
    "fashion_inference_compute_duration_seconds", "ONNX Runtime time per batch",
    buckets=LATENCY_BUCKETS,
)
DECODE_DURATION = Histogram(
    "fashion_inference_decode_duration_seconds", "Decode and preprocessing time per image",
    buckets=LATENCY_BUCKETS,
)
MODEL_LOADED = Gauge("fashion_inference_model_loaded", "1 when the model is loaded and warmed up", ["model"],
                     multiprocess_mode="livemin")  # several server processes: 1 when every one is

# --- Batch service -------------------------------------------------------------------------
BATCH_JOBS = Counter("fashion_batch_jobs", "Jobs ended, by final state (succeeded, failed, cancelled)", ["state"])
BATCH_JOBS_ACTIVE = Gauge("fashion_batch_jobs_active", "Jobs running now, by state (running, waiting)", ["state"],
                          multiprocess_mode="livesum")
BATCH_FILES = Counter(
    "fashion_batch_files", "Files handled, by outcome (success, uncertain, failed, skipped)", ["outcome"],
)
BATCH_JOB_DURATION = Histogram(
    "fashion_batch_job_duration_seconds", "Duration of ended jobs, start to end",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
BATCH_SORT_DURATION = Histogram(
    "fashion_batch_sort_duration_seconds", "Time to record and move one chunk of classified images",
    buckets=LATENCY_BUCKETS,
)
BATCH_INFERENCE_WAITS = Counter(
    "fashion_batch_inference_waits", "Retries scheduled because the Inference service was unavailable",
)
BATCH_LAST_RUN = Gauge("fashion_batch_last_run_timestamp_seconds",
                       "Unix time the last job that was not cancelled ended", multiprocess_mode="max")

# --- Monitor service -----------------------------------------------------------------------
MONITOR_CHECK_DURATION = Histogram(
    "fashion_monitor_check_duration_seconds", "Health check of a service (grpc.health.v1 plus statistics)",
    ["service"], buckets=LATENCY_BUCKETS,
)
MONITOR_SERVICE_HEALTHY = Gauge(
    "fashion_monitor_service_healthy", "1 when the last check found the service healthy", ["service"],
)
MONITOR_ALERT_FIRING = Gauge("fashion_monitor_alert_firing", "1 while the alert rule is firing", ["rule", "severity"])
MONITOR_EVALUATIONS = Counter("fashion_monitor_evaluations", "Alert rule evaluation cycles, by outcome", ["outcome"])
MONITOR_NOTIFICATIONS = Counter(
    "fashion_monitor_notifications", "Notification deliveries by notifier and outcome (sent, failed, dropped)",
    ["notifier", "outcome"],
)
MONITOR_PENDING_NOTIFICATIONS = Gauge(
    "fashion_monitor_pending_notifications", "Notifications waiting for delivery or a retry",
)

# --- REST gateway ----------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "fashion_http_requests", "HTTP requests handled by the gateway, by route template, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "fashion_http_request_duration_seconds", "Gateway HTTP request duration, first byte in to last byte out",
    ["route", "method"], buckets=LATENCY_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge("fashion_http_requests_in_flight", "HTTP requests being handled by the gateway",
                       multiprocess_mode="livesum")


FAMILIES = {
    "grpc": (GRPC_REQUESTS, GRPC_LATENCY, GRPC_IN_FLIGHT),
    "inference": (IMAGES_PROCESSED, BATCH_SIZE, QUEUE_DEPTH, QUEUE_DURATION, COMPUTE_DURATION, DECODE_DURATION,
                  MODEL_LOADED),
    "batch": (BATCH_JOBS, BATCH_JOBS_ACTIVE, BATCH_FILES, BATCH_JOB_DURATION, BATCH_SORT_DURATION,
              BATCH_INFERENCE_WAITS, BATCH_LAST_RUN),
    "monitor": (MONITOR_CHECK_DURATION, MONITOR_SERVICE_HEALTHY, MONITOR_ALERT_FIRING, MONITOR_EVALUATIONS,
                MONITOR_NOTIFICATIONS, MONITOR_PENDING_NOTIFICATIONS),
    "gateway": (HTTP_REQUESTS, HTTP_LATENCY, HTTP_IN_FLIGHT),
}
"""The metric families by what owns them."""
SERVICE_FAMILIES = {"inference": ("grpc", "inference"), "batch": ("grpc", "batch"), "monitor": ("grpc", "monitor"),
                    "gateway": ("gateway",)}
"""What each service exposes."""
for _family in (f for group in FAMILIES.values() for f in group):
    REGISTRY.unregister(_family)  # defined (counted) everywhere, exposed only by expose()


def expose(service: str) -> None:
    """Put this process's own metric families (and no other service's) in the registry its /metrics
    serves. Idempotent."""
    for group in SERVICE_FAMILIES[service]:
        for family in FAMILIES[group]:
            try:
                REGISTRY.register(family)
            except ValueError:
                pass  # exposed already (a second call)


TokenCheck = Callable[[str | None], str | None]
"""An Authorization header value -> None when it is accepted, else why not (security.TokenSource.check)."""


class ServerTls(Protocol):
    """What a metrics port serves TLS with (security.ServerSslContext)."""

    require_client_auth: bool

    def current(self) -> ssl.SSLContext:
        """The context for a new connection (the certificate as renewed)."""
        ...


TLS_HANDSHAKE_TIMEOUT_S = 10.0
"""How long a TLS connection may take to complete its handshake, and then each read or write."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    tls: ServerTls | None = None
    """None: plain HTTP."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake first, here in the connection's own thread (ThreadingMixIn: the
        serving thread only accepts), with a timeout: a client that connects and sends nothing, or
        speaks plain HTTP, costs its own thread a few seconds and holds up no other scrape."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        try:  # a failed handshake closes the connection (ssl.SSLSocket does)
            connection = self.tls.current().wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset: that client's problem only
            log.debug("Metrics port: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            self.shutdown_request(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().handle_error(request, client_address)  # as before: socketserver's traceback on stderr
            return
        log.debug("Metrics port: connection from %s failed", client_address[0], exc_info=True)


class _MetricsServer6(_MetricsServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not worth a log line

    def get_environ(self) -> dict[str, str]:
        environ = super().get_environ()
        if isinstance(self.connection, ssl.SSLSocket):
            environ["HTTPS"] = "on"  # wsgi.url_scheme https
        return environ


class _OwnFamilies:
    """What `collector` collects, less the families not in `names` (another service's, whose files every
    process writes too, since every family is defined in every process)."""

    def __init__(self, collector: MultiProcessCollector, names: set[str]) -> None:
        self.collector = collector
        self.names = names

    def collect(self) -> list[Any]:
        return [family for family in self.collector.collect() if family.name in self.names]


def summed_registry(service: str, folder: str | None = None) -> CollectorRegistry | None:
    """For processes that share one metrics view (prometheus-client's multiprocess mode: the gateway's
    workers, the Inference service's server processes), a registry summing every process's files in
    `folder` (default PROMETHEUS_MULTIPROC_DIR) over `service`'s own families; None in a single process."""
    folder = folder or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return None
    names = {metric.name for group in SERVICE_FAMILIES[service] for family in FAMILIES[group]
             for metric in family.describe()}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_OwnFamilies(MultiProcessCollector(None, path=folder), names))  # type: ignore[arg-type]
    return registry


def retire_process() -> None:
    """A process that shares its metrics with others (PROMETHEUS_MULTIPROC_DIR) is stopping: its live
    gauges (in flight, queue depth) leave the sums; its counters stay."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        mark_process_dead(os.getpid(), folder)


def retire_dead_processes(folder: str) -> None:
    """Take the live gauges (requests in flight) of processes sharing `folder` that died without stopping
    (SIGKILL, an OOM kill: the gateway's workers) out of the sums: nothing else does, and their requests
    would stay "in flight" for good. Their counters stay. Run on each scrape, off the requests' path."""
    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            mark_process_dead(int(pid), folder)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc here: ask the kernel
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def start_metrics_server(service: str, port: int, addr: str, token_check: TokenCheck | None = None,
                         registry: CollectorRegistry | None = None, tls: ServerTls | None = None) -> int:
    """Serve `service`'s own metrics (expose()), or those `registry` collects, on `addr`:`port` (port 0
    disables it) in a background thread; with `token_check`, scrapes without an accepted bearer token
    get 401; with `tls` (security.metrics_tls), HTTPS only, each connection with the context
    `tls.current()` gives at its start. Returns the port, or 0 when disabled."""
    expose(service)
    if port <= 0:
        return 0
    app = make_wsgi_app(registry if registry is not None else REGISTRY)
    if token_check is not None:
        app = _requiring_token(app, token_check)
    server = make_server(addr, port, app, _MetricsServer6 if ":" in addr else _MetricsServer,
                         handler_class=_QuietHandler)
    server.tls = tls
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    required = [what for what, needed in (("client certificate", tls is not None and tls.require_client_auth),
                                          ("bearer token", token_check is not None)) if needed]
    log.info("Prometheus metrics on %s://%s:%d/metrics%s", "https" if tls is not None else "http",
             f"[{addr}]" if ":" in addr else addr, port, f" ({' and '.join(required)} required)" if required else "")
    return port


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _requiring_token(app: WsgiApp, token_check: TokenCheck) -> WsgiApp:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refusal = token_check(environ.get("HTTP_AUTHORIZATION"))
        if refusal is None:
            return app(environ, start_response)
        body = json.dumps({"error": {"code": "UNAUTHENTICATED", "message": refusal}}).encode()
        start_response("401 Unauthorized", [("Content-Type", "application/json"), ("WWW-Authenticate", "Bearer"),
                                            ("Content-Length", str(len(body)))])
        return [body]

    return guarded
