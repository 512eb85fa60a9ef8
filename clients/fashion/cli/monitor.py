"""`fashion monitor health|dashboard|alerts`.

`health` and `dashboard` ask the Monitor service; when it is unreachable (or with --embedded)
they run the same checks and the same report code in this process, reading the Inference and
Batch services over gRPC. `health` is the monitoring guide's health_check.sh
(docs/monitoring-and-logging-guide.md) in one command: it exits 1 when
anything is not healthy (a Monitor service that does not answer included). `alerts` needs the
Monitor service, which keeps the alert state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from fashion.client import ChannelOptions, MonitorClient
from fashion.v1 import monitor_pb2 as pb

# Exit codes: 0 healthy / done, 1 something unhealthy, 2 the command could not do its job.
UNHEALTHY, FAILED = 1, 2
FALLBACK_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
STATUS = {pb.HEALTH_STATUS_HEALTHY: ("✓", "HEALTHY", "green"), pb.HEALTH_STATUS_DEGRADED: ("⚠", "DEGRADED", "yellow"),
          pb.HEALTH_STATUS_UNHEALTHY: ("✗", "UNHEALTHY", "red"), pb.HEALTH_STATUS_UNSPECIFIED: ("?", "UNKNOWN", "red")}
SEVERITY_STYLE = {"INFO": "cyan", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}


def _positive_days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if not 1 <= value <= 366:
        raise argparse.ArgumentTypeError(f"days must be between 1 and 366, got {value}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be between 1 and 10000, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from services.common.config import raw_setting

    default = raw_setting("monitor_address")
    monitor = sub.add_parser("monitor", help="system health, dashboard and alerts (the Monitor service)")
    msub = monitor.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, embeddable: bool = True) -> None:
        p.add_argument("--address", default=default, help="Monitor service host:port (FASHION_MONITOR_ADDRESS)")
        if embeddable:
            p.add_argument("--embedded", action="store_true",
                           help="check from this process instead of asking the Monitor service "
                                "(uses FASHION_INFERENCE_ADDRESS and FASHION_BATCH_ADDRESS)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = msub.add_parser("health", help="check every service and batch processing; exit 1 when anything is unhealthy")
    p.add_argument("--days", type=_positive_days, default=7, help="batch statistics window (default 7)")
    common(p)
    p.set_defaults(func=health)

    p = msub.add_parser("dashboard", help="write the monitoring report: text, PNG charts, HTML page")
    p.add_argument("--days", type=_positive_days, default=None, help="days shown by the charts (default 30)")
    p.add_argument("--text-only", action="store_true", help="only the text report, no charts")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="report folder (implies --embedded; default FASHION_REPORT_DIR, monitoring/reports)")
    common(p)
    p.set_defaults(func=dashboard)

    p = msub.add_parser("alerts", help="active alerts, their history and the rules")
    p.add_argument("--history", type=_limit, default=20, help="history entries shown (default 20)")
    p.add_argument("--rule", default="", help="only this rule")
    p.add_argument("--rules", action="store_true", help="also list the rules and their thresholds")
    common(p, embeddable=False)
    p.set_defaults(func=alerts)


def _error(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return FAILED


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


# --- health ----------------------------------------------------------------------------------------

def _embedded_health(days: int) -> tuple[pb.SystemHealth, pb.BatchHealth | None, str]:
    from services.common.config import MonitorSettings
    from services.monitor.health import BatchUnavailable
    from services.monitor.monitor import Monitor
    from services.monitor.servicer import batch_health_pb, system_health_pb

    async def run() -> tuple[pb.SystemHealth, pb.BatchHealth | None, str]:
        monitor = Monitor.embedded(MonitorSettings())
        try:
            system = await monitor.system_health()
            active = monitor.active_alerts()
            try:
                batch, error = batch_health_pb(await monitor.batch_health(days)), ""
            except BatchUnavailable as exc:
                batch, error = None, str(exc)
            return system_health_pb(system, len(active or [])), batch, error
        finally:
            await monitor.close()

    return asyncio.run(run())


def health(args: argparse.Namespace) -> int:
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
                        return _error(exc)
                    batch, batch_error = None, exc.details() or ""
        except grpc.RpcError as exc:
            if exc.code() not in FALLBACK_CODES:
                return _error(exc)
            monitor_down = f"Monitor service at {args.address} unreachable ({exc.code().name}: {exc.details()})"
            print(f"warning: {monitor_down}; checking from this process", file=sys.stderr)
            system, batch, batch_error = _embedded_health(args.days)
    healthy = (system.status == pb.HEALTH_STATUS_HEALTHY and batch is not None
               and batch.status == pb.HEALTH_STATUS_HEALTHY and not monitor_down)
    if args.json:
        out = {"healthy": healthy, "system": MessageToDict(system),
               "batch": MessageToDict(batch) if batch is not None else {"error": batch_error}}
        if monitor_down:
            out["monitor"] = {"error": monitor_down}
        print(json.dumps(out, indent=2))
        return 0 if healthy else UNHEALTHY
    console = _console()
    table = Table("service", "address", "status", "check", "details", title="Fashion Classifier — system health")
    for s in system.services:
        mark, name, style = STATUS[s.status]
        latency = f"{s.latency_ms:.1f} ms" if s.latency_ms else "-"
        table.add_row(s.name, s.address, f"[{style}]{mark} {name}[/]", latency, s.message)
    if monitor_down:
        table.add_row("monitor", args.address, "[red]✗ UNHEALTHY[/]", "-", monitor_down)
    console.print(table)
    for d in system.disks:
        console.print(f"Disk of {d.path}: {d.free_percent:.1f}% free", markup=False)
    console.print(_batch_block(batch, batch_error), markup=False)
    if system.active_alerts:
        console.print(f"[red]{system.active_alerts} active alert(s): see `fashion monitor alerts`[/]")
    mark, name, style = STATUS[pb.HEALTH_STATUS_HEALTHY if healthy else pb.HEALTH_STATUS_UNHEALTHY]
    console.print(f"[{style}]{'All systems healthy' if healthy else 'Something is not healthy'}[/]")
    return 0 if healthy else UNHEALTHY


def _batch_block(batch: pb.BatchHealth | None, error: str) -> str:
    """The monitoring guide's check_batch_health.py output, word for word where it had words."""
    rule = "=" * 60
    lines = ["", rule, "BATCH PROCESSING HEALTH CHECK", rule, ""]
    if batch is None:
        lines += ["Recent Execution: ✗ UNKNOWN", f"  {error}", "", rule]
        return "\n".join(lines)
    lines += [f"Recent Execution: {'✓ HEALTHY' if batch.recent_run else '✗ UNHEALTHY'}", f"  {batch.message}", ""]
    if batch.recent_errors:
        lines.append(f"Recent Errors: ✗ {len(batch.recent_errors)} errors detected")
        lines += [f"  - {e}" for e in batch.recent_errors[:10]]
    else:
        lines.append("Recent Errors: ✓ No errors detected")
    s = batch.stats
    lines += ["", f"Last {s.days} Days Statistics:", f"  Total runs: {s.runs:,}", f"  Images processed: {s.images:,}",
              f"  Successful: {s.successful:,}", f"  Failed: {s.failed:,}", f"  Success rate: {s.success_rate:.1f}%"]
    if s.top_categories:
        top = ", ".join(f"{c.category} {c.count:,}" for c in list(s.top_categories)[:5])
        lines.append(f"  Top categories: {top}")
    lines += ["", rule]
    return "\n".join(lines)


# --- dashboard -------------------------------------------------------------------------------------

def _embedded_report(days: int | None, text_only: bool, output_dir: Path | None) -> pb.Report:
    from services.common.config import MonitorSettings
    from services.monitor.monitor import Monitor
    from services.monitor.servicer import HEALTH

    overrides = {"report_dir": output_dir} if output_dir is not None else {}
    settings = MonitorSettings(**overrides)  # type: ignore[arg-type]

    async def run() -> pb.Report:
        monitor = Monitor.embedded(settings)
        try:
            files, status = await monitor.generate_report(days or 0, text_only)
        finally:
            await monitor.close()
        report = pb.Report(text_path=str(files.text_path.absolute()), text=files.text, status=HEALTH[status],
                           html_path=str(files.html_path.absolute()) if files.html_path else "",
                           chart_paths=[str(p.absolute()) for p in files.chart_paths])
        report.generated_at.FromDatetime(files.generated_at)
        return report

    return asyncio.run(run())


def dashboard(args: argparse.Namespace) -> int:
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
                return _error(exc)
            print(f"warning: Monitor service at {args.address} unreachable ({exc.code().name}); "
                  "writing the report from this process", file=sys.stderr)
            report = _embedded_report(args.days, args.text_only, None)
    if args.json:
        print(json.dumps(MessageToDict(report, always_print_fields_with_no_presence=True), indent=2))
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
        return _error(exc)
    if args.json:
        print(json.dumps(MessageToDict(resp), indent=2))
        return 0
    console = _console()
    if resp.active:
        table = Table("severity", "alert", "since", "notified", "message", title="Active alerts")
        for a in resp.active:
            sev = _severity(a.severity)
            table.add_row(f"[{SEVERITY_STYLE[sev]}]{sev}[/]", f"{a.title} ({a.rule})", _when(a.started_at),
                          "yes" if a.notified else "held (cooldown)", a.message)
        console.print(table)
    else:
        console.print("[green]✓ No active alerts[/]")
    if resp.history:
        table = Table("time", "event", "severity", "alert", "notified", "message", title="History (newest first)")
        for e in resp.history:
            sev = _severity(e.severity)
            table.add_row(_when(e.at), e.kind, f"[{SEVERITY_STYLE[sev]}]{sev}[/]", e.title,
                          "yes" if e.notified else "no", e.message)
        console.print(table)
    else:
        console.print("No alert history yet")
    if resp.pending_notifications:
        console.print(f"[yellow]{resp.pending_notifications} notification(s) waiting for delivery (retrying)[/]")
    if args.rules:
        table = Table("rule", "title", "severity", "fires when", "enabled", title="Rules")
        for r in resp.rules:
            table.add_row(r.rule, r.title, _severity(r.severity), r.condition, "yes" if r.enabled else "no")
        console.print(table)
    return 0
