"""`fashion monitor health|dashboard|alerts`.

`health` and `dashboard` ask the Monitor service; when it is unreachable (or with --embedded)
they run the same checks and the same report code in this process, reading the Inference and
Batch services over gRPC. `health` is the monitoring guide's health_check.sh
(docs/monitoring-and-logging-guide.md) in one command: it exits 1 when a service is down or
unhealthy (the REST gateway's /health and a Monitor service that does not answer included), 0 when
everything serves, printing warnings for what is degraded (batch processing problems among them);
--strict exits 1 for warnings too. `alerts` needs the Monitor service, which keeps the alert state.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fashion.cli.batch import batch_health_text
from fashion.cli.errors import rpc_failure
from fashion.cli.server import server_function
from fashion.cli.terminal import console as new_console
from fashion.cli.terminal import literal
from fashion.client import ChannelOptions, MonitorClient
from fashion.client.protojson import dumps, to_json
from fashion.client.text import printable
from fashion.v1 import batch_pb2, health_pb2
from fashion.v1 import monitor_pb2 as pb

# Exit codes: 0 healthy / done, 1 something unhealthy, 2 the command could not do its job.
UNHEALTHY, FAILED = 1, 2
FALLBACK_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
STATUS = {health_pb2.HEALTH_STATUS_HEALTHY: ("✓", "HEALTHY", "green"),
          health_pb2.HEALTH_STATUS_DEGRADED: ("⚠", "DEGRADED", "yellow"),
          health_pb2.HEALTH_STATUS_UNHEALTHY: ("✗", "UNHEALTHY", "red"),
          health_pb2.HEALTH_STATUS_UNSPECIFIED: ("?", "UNKNOWN", "red")}
SEVERITY_STYLE = {"INFO": "cyan", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}


def _error(exc: grpc.RpcError, address: str) -> int:
    print(rpc_failure(exc, "Monitor", address), file=sys.stderr)
    return FAILED


def _console() -> Console:
    return new_console(highlight=False, soft_wrap=False)


# --- health ----------------------------------------------------------------------------------------

def _embedded_health(days: int) -> tuple[pb.SystemHealth, batch_pb2.BatchHealth | None, str]:
    return server_function("monitor_health", "monitor health --embedded")(days)


def health(args: argparse.Namespace) -> int:
    """Exit 1 when a service is down or unhealthy (the gateway's /health included); degraded services,
    low disks and batch processing problems are warnings (exit 0, or 1 with --strict)."""
    monitor_down = ""
    batch_error = ""
    if args.embedded:
        system, batch, batch_error = _embedded_health(args.days)
    else:
        try:
            # No client-side retries: an unreachable monitor falls back at once, and a Batch
            # service that is down (UNAVAILABLE from GetBatchHealth) is an answer, not a blip.
            with MonitorClient(ChannelOptions.from_env(args.address, retries=1)) as client:
                system = client.system_health()
                try:
                    batch = client.batch_health(args.days)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        return _error(exc, args.address)
                    batch, batch_error = None, exc.details() or ""
        except grpc.RpcError as exc:
            if exc.code() not in FALLBACK_CODES:
                return _error(exc, args.address)
            monitor_down = f"Monitor service at {args.address} unreachable ({exc.code().name}: {exc.details()})"
            print(f"warning: {monitor_down}; checking from this process", file=sys.stderr)
            system, batch, batch_error = _embedded_health(args.days)
    down = [s.name for s in system.services if s.status == health_pb2.HEALTH_STATUS_UNHEALTHY]
    if monitor_down:
        down.append("monitor")
    warnings = _warnings(system, batch, batch_error)
    status = "unhealthy" if down else "degraded" if warnings else "healthy"
    code = UNHEALTHY if down or (args.strict and warnings) else 0
    if args.json:
        out = {"healthy": status == "healthy", "status": status, "down": down, "warnings": warnings,
               "system": to_json(system),
               "batch": to_json(batch) if batch is not None else {"error": batch_error}}
        if monitor_down:
            out["monitor"] = {"error": monitor_down}
        print(dumps(out))
        return code
    console = _console()
    table = Table("service", "address", "status", "check", "details", title="Fashion Classifier — system health")
    for s in system.services:
        mark, name, style = STATUS[s.status]
        latency = f"{s.latency_ms:.1f} ms" if s.latency_ms else "-"
        table.add_row(s.name, literal(s.address), f"[{style}]{mark} {name}[/]", latency, literal(s.message))
    if monitor_down:
        table.add_row("monitor", literal(args.address), "[red]✗ UNHEALTHY[/]", "-", literal(monitor_down))
    console.print(table)
    for d in system.disks:
        console.print(f"Disk of {printable(d.path)}: {d.free_percent:.1f}% free", markup=False)
    console.print("\n" + (batch_health_text(batch) if batch is not None else _batch_unknown(batch_error)),
                  markup=False)
    if system.active_alerts:
        console.print(f"[red]{system.active_alerts} active alert(s): see `fashion monitor alerts`[/]")
    for warning in warnings:
        console.print(f"⚠ {printable(warning)}", style="yellow", markup=False, highlight=False)
    if down:
        console.print(f"✗ Down or unhealthy: {', '.join(down)}", style="red", markup=False)
    elif warnings:
        strict = " (--strict: exit 1)" if args.strict else ""
        console.print(f"⚠ Serving, with {len(warnings)} warning(s){strict}", style="yellow", markup=False)
    else:
        console.print("✓ All systems healthy", style="green", markup=False)
    return code


def _warnings(system: pb.SystemHealth, batch: batch_pb2.BatchHealth | None, batch_error: str) -> list[str]:
    """What needs attention without anything being down: degraded services, low disks, batch processing."""
    warnings = [f"{s.name}: {s.message}" for s in system.services if s.status == health_pb2.HEALTH_STATUS_DEGRADED]
    if system.status != health_pb2.HEALTH_STATUS_HEALTHY and not warnings and all(
            s.status == health_pb2.HEALTH_STATUS_HEALTHY for s in system.services):
        warnings.append("a monitored disk is low on free space")
    if batch is None:
        warnings.append(f"batch processing: unknown ({batch_error})")
    elif batch.status != health_pb2.HEALTH_STATUS_HEALTHY:
        name = health_pb2.HealthStatus.Name(batch.status).removeprefix("HEALTH_STATUS_")
        detail = (f"job {batch.failed_job.job_id} failed: {batch.failed_job.error}" if batch.HasField("failed_job")
                  else f"{len(batch.recent_errors)} recent errors" if batch.recent_errors and batch.recent_run
                  else batch.message)
        warnings.append(f"batch processing {name}: {detail}")
    return warnings


def _batch_unknown(error: str) -> str:
    rule = "=" * 60
    return "\n".join([rule, "BATCH PROCESSING HEALTH CHECK", rule, "", "Recent Execution: ✗ UNKNOWN", f"  {error}",
                      "", rule])


# --- dashboard -------------------------------------------------------------------------------------

def _embedded_report(days: int | None, text_only: bool, output_dir: Path | None) -> pb.Report:
    return server_function("monitor_report", "monitor dashboard --embedded")(days, text_only, output_dir)


def dashboard(args: argparse.Namespace) -> int:
    try:
        return _dashboard(args)
    except OSError as exc:  # the report folder cannot be made or written: could not run, not "unhealthy"
        where = f" {printable(exc.filename)}" if exc.filename else ""
        print(f"error: cannot write the report{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _dashboard(args: argparse.Namespace) -> int:
    where = "in this process"
    if args.embedded or args.output_dir is not None:
        report = _embedded_report(args.days, args.text_only, args.output_dir)
    else:
        try:
            with MonitorClient(args.address) as client:
                report = client.generate_report(args.days or 0, args.text_only)
            where = f"by the Monitor service at {args.address}, on its machine"
        except grpc.RpcError as exc:
            if exc.code() not in FALLBACK_CODES:
                return _error(exc, args.address)
            print(f"warning: Monitor service at {args.address} unreachable ({exc.code().name}); "
                  "writing the report from this process", file=sys.stderr)
            report = _embedded_report(args.days, args.text_only, None)
    if args.json:
        print(dumps(report))
        return 0
    console = _console()
    console.print(report.text, markup=False)
    console.print(f"Written {where}:", markup=False)
    for path in [report.text_path, *report.chart_paths, report.html_path]:
        if path:
            console.print(f"  {path}", markup=False)
    return 0


# --- alerts ----------------------------------------------------------------------------------------

def _when(ts) -> str:  # type: ignore[no-untyped-def]
    return datetime.fromtimestamp(ts.seconds).strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else "-"


def _severity(value: int) -> str:
    return pb.Severity.Name(value).removeprefix("SEVERITY_")  # type: ignore[arg-type]


def alerts(args: argparse.Namespace) -> int:
    try:
        with MonitorClient(args.address) as client:
            resp = client.alerts(args.history, args.rule)
    except grpc.RpcError as exc:
        return _error(exc, args.address)
    if args.json:
        print(dumps(resp))
        return 0
    console = _console()
    if resp.active:
        # Rule names stay whole (they are what --rule takes); the free text wraps around them.
        table = Table("severity", "alert", "since", "notified", "message", title="Active alerts")
        table.columns[1].no_wrap = True
        for a in resp.active:
            sev = _severity(a.severity)
            alert = Text("\n").join([literal(a.title), literal(f"({a.rule})")])
            table.add_row(f"[{SEVERITY_STYLE[sev]}]{sev}[/]", alert, _when(a.started_at),
                          "yes" if a.notified else "held (cooldown)", literal(a.message))
        console.print(table)
    else:
        console.print("[green]✓ No active alerts[/]")
    if resp.history:
        table = Table("time", "event", "severity", "alert", "notified", "message", title="History (newest first)")
        for e in resp.history:
            sev = _severity(e.severity)
            table.add_row(_when(e.at), e.kind, f"[{SEVERITY_STYLE[sev]}]{sev}[/]", literal(e.title),
                          "yes" if e.notified else "no", literal(e.message))
        console.print(table)
    else:
        console.print("No alert history yet")
    if resp.pending_notifications:
        console.print(f"[yellow]{resp.pending_notifications} notification(s) waiting for delivery (retrying)[/]")
    if args.rules:
        table = Table("rule", "title", "severity", "fires when", "enabled", title="Rules")
        table.columns[0].no_wrap = True
        for r in resp.rules:
            table.add_row(r.rule, literal(r.title), _severity(r.severity), literal(r.condition),
                          "yes" if r.enabled else "no")
        console.print(table)
    return 0


# --- test-alert ------------------------------------------------------------------------------------

def test_alert(args: argparse.Namespace) -> int:
    """Exit 0 when every notifier delivered, 1 when one did not, 2 when none is configured or the Monitor
    service could not be asked."""
    if args.embedded:
        try:
            response = server_function("monitor_test_alert", "monitor test-alert --embedded")(args.channel)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return FAILED
    else:
        try:
            with MonitorClient(ChannelOptions.from_env(args.address, retries=1, timeout_s=60.0)) as client:
                response = client.send_test_alert(args.channel)
        except grpc.RpcError as exc:
            return _error(exc, args.address)
    if args.json:
        print(dumps(response))
    else:
        for result in response.results:
            where = f" ({result.destination})" if result.destination else ""
            if result.delivered:
                print(f"✓ {result.channel}{where}: test alert sent")
            else:
                print(f"✗ {result.channel}{where}: not delivered: {result.error}")
    return 0 if all(r.delivered for r in response.results) else UNHEALTHY
