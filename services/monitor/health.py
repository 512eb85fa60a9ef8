"""System checks: the Inference and Batch services through grpc.health.v1 and their statistics
RPCs, the gateway's /health, the free space of the monitored disks, and the batch processing health
of the monitoring guide's check_batch_health.py (docs/monitoring-and-logging-guide.md) as the Batch
service judges it (GetBatchHealth: never from its files, so the services may run on other machines)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import grpc

from fashion.client import AsyncBatchClient, AsyncInferenceClient, ChannelOptions, TlsFileError
from fashion.v1 import batch_pb2, health_pb2
from fashion.v1 import inference_pb2 as inference_pb
from services.common import metrics, security
from services.common.config import MonitorSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

STATS_DAYS = 7
DRIFT_DAYS = 8  # the last day plus the 7 before it


class Health(StrEnum):
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    UNHEALTHY = "UNHEALTHY"


def worst(*statuses: Health) -> Health:
    order = [Health.HEALTHY, Health.DEGRADED, Health.UNHEALTHY]
    return max(statuses, key=order.index, default=Health.HEALTHY)


class BatchUnavailable(Exception):
    """The Batch service did not answer GetBatchStats."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ServiceCheck:
    """One service as the last check found it."""

    name: str
    address: str
    status: Health
    serving_status: str
    """grpc.health.v1 answer, or the gRPC code of the failed call."""
    message: str
    latency_ms: float
    checked_at: datetime
    reachable: bool
    inference_stats: inference_pb.Stats | None = None
    batch_stats: batch_pb2.BatchStats | None = None


@dataclass(frozen=True)
class DiskCheck:
    path: Path
    total_bytes: int
    free_bytes: int
    folder_bytes: int = 0
    remote: str = ""
    """The service that measured it ("" when this process did): its folder size is not known here."""

    @property
    def free_percent(self) -> float:
        return 100.0 * self.free_bytes / self.total_bytes if self.total_bytes else 100.0

    @property
    def label(self) -> str:
        return f"{self.path} (on the {self.remote})" if self.remote else str(self.path)


@dataclass(frozen=True)
class SystemCheck:
    checked_at: datetime
    inference: ServiceCheck
    batch: ServiceCheck
    disks: list[DiskCheck]
    drift_stats: batch_pb2.BatchStats | None = None
    """The Batch service's statistics of the last 8 days (for the drift rule)."""
    disk_free_min_percent: float = 0.0
    gateway: ServiceCheck | None = None
    """The REST gateway's /health (None when FASHION_GATEWAY_ADDRESS is empty: not watched)."""

    @property
    def services(self) -> list[ServiceCheck]:
        return [self.inference, self.batch, *([self.gateway] if self.gateway is not None else [])]

    @property
    def low_disks(self) -> list[DiskCheck]:
        return [d for d in self.disks if d.free_percent < self.disk_free_min_percent]

    @property
    def status(self) -> Health:
        """UNHEALTHY when a service is, DEGRADED when a service is or a disk is low on space."""
        return worst(*(s.status for s in self.services), Health.DEGRADED if self.low_disks else Health.HEALTHY)


@dataclass(frozen=True)
class BatchHealthResult:
    """The monitoring guide's batch health check: recent execution, recent errors, the window's statistics."""

    status: Health
    message: str
    recent_run: bool
    max_age_hours: float
    success_rate_min: float
    stats: batch_pb2.BatchStats
    checked_at: datetime
    recent_errors: list[str] = field(default_factory=list)
    report: batch_pb2.BatchHealth | None = None
    """The Batch service's answer, as it came (what GetBatchHealth passes on)."""


HEALTH_OF = {health_pb2.HEALTH_STATUS_HEALTHY: Health.HEALTHY, health_pb2.HEALTH_STATUS_DEGRADED: Health.DEGRADED,
             health_pb2.HEALTH_STATUS_UNHEALTHY: Health.UNHEALTHY}


def batch_health_result(report: batch_pb2.BatchHealth) -> BatchHealthResult:
    """The Batch service's batch health check (GetBatchHealth, where it is judged) as the Monitor shows it."""
    return BatchHealthResult(HEALTH_OF.get(report.status, Health.UNHEALTHY), report.message, report.recent_run,
                             report.max_age_hours, report.success_rate_min, report.stats,
                             report.checked_at.ToDatetime().astimezone() if report.HasField("checked_at")
                             else datetime.now().astimezone(), list(report.recent_errors), report)


@dataclass(frozen=True)
class HttpHealth:
    """What an HTTP /health endpoint answered: its status code (None when it could not be reached)."""

    code: int | None
    status: str = ""
    classes: int = 0
    error: str = ""


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address whose certificate names `server_name` rather than the address's host."""

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext, server_name: str) -> None:
        super().__init__(host, port, timeout=timeout, context=tls)
        self.tls, self.server_name = tls, server_name

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.server_name)


def http_health(address: str, timeout_s: float, tls: ssl.SSLContext | None = None,
                server_name: str = "") -> HttpHealth:
    """GET http://`address`/health (blocking; https with `tls`, the certificate checked against
    `server_name` when set, else the address's host) and read the guide's /health body:
    {"status": "healthy", "classes": 10, ...}."""
    try:
        where = urllib.parse.urlsplit(f"//{address}")  # host:port, [v6]:port, or a host alone
        host, port = where.hostname or "", where.port or (80 if tls is None else 443)
        if tls is None:
            connection: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=timeout_s)
        else:
            connection = _NamedHTTPSConnection(host, port, timeout_s, tls, server_name or host)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            code, raw = response.status, response.read(65536)
        finally:
            connection.close()
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return HttpHealth(None, error=str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc))
    try:
        body = json.loads(raw)
    except ValueError:
        return HttpHealth(code, error="the answer is not JSON")
    if not isinstance(body, dict):
        return HttpHealth(code, error="the answer is not a JSON object")
    return HttpHealth(code, str(body.get("status", "")), int(body.get("classes", 0) or 0))


def short_details(details: str | None) -> str:
    """gRPC's connection errors end with the cause people need ("Connection refused"); keep that."""
    text = details or ""
    if text.startswith("failed to connect to all addresses") and ": " in text:
        return text.rsplit(": ", 1)[1]
    return text


def human_size(n: float) -> str:
    """Bytes as the monitoring guide's report writes them: "45.23 MB", "2.34 GB"."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            break
    return f"{n:.2f} {unit}"


def disk_checks(folders: list[Path], with_sizes: bool = False) -> list[DiskCheck]:
    """Free space of the file system of each folder (its nearest existing parent when it does not
    exist yet); with_sizes also adds up each folder's files (for the report's DISK USAGE)."""
    checks = []
    for folder in folders:
        probe = folder.absolute()
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        try:
            usage = shutil.disk_usage(probe)
        except OSError as exc:
            log.warning("Cannot read disk usage of %s: %s", folder, exc)
            continue
        size = folder_size(folder) if with_sizes else 0
        checks.append(DiskCheck(folder, usage.total, usage.free, size))
    return checks


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under `folder` (symlinks not followed; 0 when it does not exist)."""
    total = 0
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue  # a file removed while we walk
        except OSError:
            continue
    return total


class SystemChecker:
    """Checks the Inference and Batch services with the client library, over long-lived channels
    (created on first use, inside the running event loop) whose options come from the settings like
    every channel between the services. Reconnect backoff is capped low so that a restarted service is
    seen as up again at the next check rather than minutes later; calls are not retried (a check that
    fails says so at once)."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self._inference: AsyncInferenceClient | None = None
        self._batch: AsyncBatchClient | None = None

    def _options(self, address: str) -> ChannelOptions:
        return security.client_options(self.settings, address, timeout_s=self.settings.monitor_check_timeout_s,
                                       retries=1, reconnect_backoff_s=min(5.0, self.settings.monitor_check_interval_s))

    @property
    def inference(self) -> AsyncInferenceClient:
        if self._inference is None:
            self._inference = AsyncInferenceClient(self._options(self.settings.inference_address))
        return self._inference

    @property
    def batch(self) -> AsyncBatchClient:
        if self._batch is None:
            self._batch = AsyncBatchClient(self._options(self.settings.batch_address))
        return self._batch

    async def close(self) -> None:
        clients = [c for c in (self._inference, self._batch) if c is not None]
        self._inference = self._batch = None
        for client in clients:
            await client.close()

    async def check(self, with_sizes: bool = False, with_drift: bool = False) -> SystemCheck:
        """Both services with their statistics and the disks at once; with_sizes adds the folder
        sizes (the report), with_drift the 8-day window of the drift rule (the evaluation)."""
        folders = list(self.settings.report_folders)
        inference, batch, gateway, disks = await asyncio.gather(
            self.check_inference(), self.check_batch(), self.check_gateway(),
            asyncio.to_thread(disk_checks, folders, with_sizes))
        stats = batch.batch_stats
        if stats is not None and stats.data_total_bytes > 0:
            disks.append(DiskCheck(Path(stats.data_root), stats.data_total_bytes, stats.data_free_bytes,
                                   remote="Batch service"))
        drift = None
        if with_drift and stats is not None:
            try:
                drift = await self.batch_stats(DRIFT_DAYS)
            except BatchUnavailable as exc:
                log.warning("%s", exc)
        return SystemCheck(datetime.now().astimezone(), inference, batch, disks, drift,
                           self.settings.alert_disk_free_min_percent, gateway)

    async def _health(self, client: AsyncInferenceClient | AsyncBatchClient) -> tuple[str, float, str]:
        """grpc.health.v1 Check of the overall status: (answer or code name, latency ms, error detail)."""
        start = time.perf_counter()
        try:
            serving = await client.health(timeout_s=self.settings.monitor_check_timeout_s)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, 0.0, short_details(exc.details())
        return serving, (time.perf_counter() - start) * 1000, ""

    async def check_inference(self) -> ServiceCheck:
        address = self.settings.inference_address
        start = time.perf_counter()
        serving, latency, error = await self._health(self.inference)
        now = datetime.now().astimezone()
        if error:
            result = ServiceCheck("inference", address, Health.UNHEALTHY, serving,
                                  f"Inference service at {address} unreachable ({serving}: {error})",
                                  latency, now, reachable=False)
            return self._observed(result, start)
        stats, stats_error = None, ""
        try:
            stats = await self.inference.stats()
        except grpc.aio.AioRpcError as exc:
            stats_error = f"{exc.code().name}: {short_details(exc.details())}"
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                refused = security.token_refused(self.settings, f"the Inference service at {address}",
                                                 exc.details() or "")
                result = ServiceCheck("inference", address, Health.UNHEALTHY, serving, refused, latency, now, True)
                return self._observed(result, start)
        if serving != "SERVING":
            why = "model not loaded" if stats is not None and not stats.model_loaded else "not serving"
            status, message = Health.UNHEALTHY, f"{serving} ({why})"
        elif stats is None:
            status, message = Health.DEGRADED, f"SERVING, but GetStats failed ({stats_error})"
        else:
            status = Health.HEALTHY
            message = (f"SERVING; model {stats.model_name} v{stats.model_version} loaded; "
                       f"{stats.total_images_processed:,} images, {stats.success_rate:.2f}% success, "
                       f"average {stats.average_latency_ms:.1f} ms")
        result = ServiceCheck("inference", address, status, serving, message, latency, now, True, inference_stats=stats)
        return self._observed(result, start)

    async def check_batch(self) -> ServiceCheck:
        address = self.settings.batch_address
        start = time.perf_counter()
        serving, latency, error = await self._health(self.batch)
        now = datetime.now().astimezone()
        if error:
            result = ServiceCheck("batch", address, Health.UNHEALTHY, serving,
                                  f"Batch service at {address} unreachable ({serving}: {error})",
                                  latency, now, reachable=False)
            return self._observed(result, start)
        stats, stats_error = None, ""
        try:
            stats = await self.batch_stats(STATS_DAYS)
        except BatchUnavailable as exc:
            stats_error = str(exc)
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                result = ServiceCheck("batch", address, Health.UNHEALTHY, serving, stats_error, latency, now, True)
                return self._observed(result, start)
        if serving != "SERVING":
            status, message = Health.UNHEALTHY, f"{serving}"
        elif stats is None:
            status, message = Health.DEGRADED, f"SERVING, but {stats_error}"
        else:
            status = Health.HEALTHY
            last = (f"last run {stats.last_run_age_hours:.1f} hours ago" if stats.HasField("last_run_at")
                    else "no run finished yet")
            message = f"SERVING; {stats.active_jobs} active jobs; {last}"
        result = ServiceCheck("batch", address, status, serving, message, latency, now, True, batch_stats=stats)
        return self._observed(result, start)

    async def check_gateway(self) -> ServiceCheck | None:
        """The REST gateway's /health, as the guide's health_check.sh asks it (None when not watched)."""
        address = self.settings.gateway_address
        if not address:
            return None
        start = time.perf_counter()
        # With FASHION_TLS the gateway serves HTTPS (client certificates required with FASHION_TLS_CLIENT_CA):
        # the check speaks it as the calls to the other services do.
        options = self._options(address)
        try:
            tls = options.ssl_context()  # read at each check: renewed certificates are used as they come
        except (TlsFileError, ssl.SSLError, OSError) as exc:  # a certificate file gone or damaged since the start
            answer = HttpHealth(None, error=f"the TLS files cannot be used: {exc}")
        else:
            answer = await asyncio.to_thread(http_health, address, self.settings.monitor_check_timeout_s, tls,
                                             options.server_name)
        latency = (time.perf_counter() - start) * 1000
        now = datetime.now().astimezone()
        if answer.code is None:
            result = ServiceCheck("gateway", address, Health.UNHEALTHY, "unreachable",
                                  f"REST gateway at {address} unreachable ({answer.error})", 0.0, now, reachable=False)
        elif answer.code == 200 and answer.status == "healthy":
            result = ServiceCheck("gateway", address, Health.HEALTHY, "HTTP 200 healthy",
                                  f"/health answers healthy; model loaded, {answer.classes} classes", latency, now,
                                  True)
        elif answer.code == 503:
            result = ServiceCheck("gateway", address, Health.UNHEALTHY, f"HTTP 503 {answer.status or 'unhealthy'}",
                                  "/health answers unhealthy: the Inference service behind it is not serving its model",
                                  latency, now, True)
        else:
            result = ServiceCheck("gateway", address, Health.UNHEALTHY, f"HTTP {answer.code}",
                                  f"/health answers HTTP {answer.code}{f': {answer.error}' if answer.error else ''}",
                                  latency, now, reachable=False)
        return self._observed(result, start)

    async def batch_stats(self, days: int) -> batch_pb2.BatchStats:
        """GetBatchStats over `days`; BatchUnavailable when the Batch service does not answer."""
        return await self._ask_batch("GetBatchStats", self.batch.stats(days))

    async def batch_health(self, days: int) -> BatchHealthResult:
        """The Batch service's judgment of batch processing (GetBatchHealth); BatchUnavailable when it
        does not answer."""
        return batch_health_result(await self._ask_batch("GetBatchHealth", self.batch.batch_health(days)))

    async def _ask_batch(self, method: str, call: Awaitable[T]) -> T:
        """The answer of a call to the Batch service; its failure as BatchUnavailable naming `method`
        (a refused token as token_refused says it)."""
        address = self.settings.batch_address
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise BatchUnavailable(security.token_refused(self.settings, f"the Batch service at {address}",
                                                              exc.details() or ""), exc.code()) from exc
            raise BatchUnavailable(
                f"{method} of the Batch service at {address} failed ({exc.code().name}: "
                f"{short_details(exc.details())})", exc.code()
            ) from exc

    @staticmethod
    def _observed(result: ServiceCheck, start: float) -> ServiceCheck:
        metrics.MONITOR_CHECK_DURATION.labels(result.name).observe(time.perf_counter() - start)
        metrics.MONITOR_SERVICE_HEALTHY.labels(result.name).set(1 if result.status == Health.HEALTHY else 0)
        return result
