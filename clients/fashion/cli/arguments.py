"""Every `fashion` command's arguments. Kept apart from the commands, and free of grpc, protobuf and
rich, so that parsing (and `--help`) stays quick: each command is named as "module:function" under
fashion.cli and imported only when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from fashion.defaults import service_address

SERVICE_NAMES = ("inference", "batch", "monitor", "gateway")
JOB_STATES = ("queued", "running", "waiting", "succeeded", "failed", "cancelled")  # fashion.v1.JobState


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashion", description="Fashion-image classifier: services and tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _system(commands)
    _inference(commands)
    _batch(commands)
    _monitor(commands)
    return parser


def _command(parser: argparse.ArgumentParser, handler: str) -> None:
    parser.set_defaults(handler=handler)


# --- the system itself (server package) ------------------------------------------------------------

def _system(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="run one service in the foreground (server package)")
    p.add_argument("service", choices=SERVICE_NAMES)
    _command(p, "system:serve")

    p = commands.add_parser("run", help="run the whole local stack in the foreground, Ctrl-C stops it (server package)")
    p.add_argument("--only", nargs="+", choices=SERVICE_NAMES, help="run only these services")
    _command(p, "system:run")

    p = commands.add_parser("config", help="show all settings with their environment variables (server package)")
    _command(p, "system:config")


# --- inference -------------------------------------------------------------------------------------

def _inference_address(p: argparse.ArgumentParser) -> None:
    """--address and --timeout: where the Inference service is and how long each call may take."""
    p.add_argument("--address", default=service_address("inference"),
                   help="Inference service host:port (FASHION_INFERENCE_ADDRESS)")
    p.add_argument("--timeout", type=_call_seconds, default=None, metavar="SECONDS",
                   help="deadline of each call to the service (default 30)")


def _call_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86_400:  # float('nan') fails this too
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, got {text}")
    return value


def _inference(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("classify", help="classify image files with the Inference service")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    _inference_address(p)
    _command(p, "inference:classify")

    p = commands.add_parser("stats", help="the Inference service's statistics (JSON)")
    _inference_address(p)
    _command(p, "inference:stats")

    model = commands.add_parser("model", help="the model: info, evaluate")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    p = model_commands.add_parser("info", help="the served model (name, version, labels, input, provider)")
    _inference_address(p)
    _command(p, "inference:model_info")

    p = model_commands.add_parser("evaluate",
                                  help="accuracy, calibration and speed of a model folder, offline (server package)")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (default: the shipped model)")
    p.add_argument("--photos", type=int, default=2000,
                   help="test images also rendered as product photos (0 skips; 10000 = all)")
    p.add_argument("--non-fashion", type=int, default=300,
                   help="blank pages, noise images and text photos scored, of each kind")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-benchmark", action="store_true", help="skip the model-only throughput run")
    p.add_argument("--out", type=Path, default=Path("results/evaluation"), help="where metrics.json and the plots go")
    p.add_argument("--json", action="store_true", help="print the metrics JSON instead of the report")
    _command(p, "inference:evaluate")


# --- batch -----------------------------------------------------------------------------------------

def _batch(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser("batch", help="batch jobs: sort folders of images into category folders")
    batch_commands = batch.add_subparsers(dest="batch_command", required=True, metavar="COMMAND")

    p = batch_commands.add_parser("submit", help="start a job on the Batch service")
    p.add_argument("dir", metavar="DIR", help="folder to process, under the data root")
    _job_options(p)
    p.add_argument("--key", default="", help="idempotency key: submitting twice returns the first job")
    p.add_argument("--wait", action="store_true", help="show progress until the job ends, then a summary")
    _batch_output_options(p)
    _command(p, "batch:submit")

    p = batch_commands.add_parser("run", help="run a job in this process, without a Batch server (for cron; "
                                              "server package)")
    p.add_argument("dir", metavar="DIR", help="folder to process, under the data root")
    _job_options(p)
    p.add_argument("--inference-address", default=None, help="Inference service host:port "
                                                             "(FASHION_INFERENCE_ADDRESS)")
    p.add_argument("--json", action="store_true", help="print the final job as JSON instead of a table")
    p.add_argument("--max-wait", type=float, default=None, metavar="SECONDS",
                   help="stop (exit 2; the job resumes at the next run) when the Inference service has not "
                        "answered for this long; 0: wait as long as it takes (FASHION_BATCH_RUN_MAX_WAIT_S, 1800)")
    p.add_argument("--shard-count", type=int, default=None, metavar="N",
                   help="scale-out: split the images into N shards by a stable hash of their path "
                        "(FASHION_BATCH_SHARD_COUNT)")
    p.add_argument("--shard-index", type=int, default=None, metavar="I",
                   help="the shard this process sorts, 0..N-1 (default: JOB_COMPLETION_INDEX of a Kubernetes "
                        "Indexed Job, else 0)")
    _command(p, "batch:run_embedded")

    p = batch_commands.add_parser("status", help="one job's state and counts")
    p.add_argument("job_id", metavar="JOB")
    _batch_output_options(p)
    _command(p, "batch:status")

    p = batch_commands.add_parser("list", help="recent jobs, most recent first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--state", choices=JOB_STATES, default=None)
    _batch_output_options(p)
    _command(p, "batch:list_jobs")

    p = batch_commands.add_parser("watch", help="follow a job's progress until it ends")
    p.add_argument("job_id", metavar="JOB")
    _batch_address(p)
    _command(p, "batch:watch")

    p = batch_commands.add_parser("cancel", help="stop a queued or running job (sorted files stay sorted)")
    p.add_argument("job_id", metavar="JOB")
    _batch_output_options(p)
    _command(p, "batch:cancel")

    p = batch_commands.add_parser("health", help="batch processing health check (exit 1 when unhealthy)")
    p.add_argument("--days", type=int, default=7, help="statistics window in days (default 7)")
    p.add_argument("--max-age-hours", type=float, default=None,
                   help="a last run older than this is unhealthy (default: the server's "
                        "FASHION_BATCH_MAX_AGE_HOURS, 26)")
    p.add_argument("--local", action="store_true",
                   help="read the jobs database under FASHION_DATA_ROOT directly instead of asking the service "
                        "(server package)")
    _batch_output_options(p)
    _command(p, "batch:health")


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--copy", action="store_true", help="copy images instead of moving them")
    p.add_argument("--recursive", "-r", action="store_true", help="also process subfolders")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="below it images go to _uncertain/ (default: the model's)")
    p.add_argument("--output", default="", help="folder of the category folders, under the data root "
                                                "(default processed_batches)")


def _batch_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _batch_address(p)


def _batch_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=service_address("batch"),
                   help="Batch service host:port (FASHION_BATCH_ADDRESS)")


# --- monitor ---------------------------------------------------------------------------------------

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


def _monitor(commands: argparse._SubParsersAction) -> None:
    default = service_address("monitor")
    monitor = commands.add_parser("monitor", help="system health, dashboard and alerts (the Monitor service)")
    monitor_commands = monitor.add_subparsers(dest="monitor_command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, embeddable: bool = True) -> None:
        p.add_argument("--address", default=default, help="Monitor service host:port (FASHION_MONITOR_ADDRESS)")
        if embeddable:
            p.add_argument("--embedded", action="store_true",
                           help="check from this process instead of asking the Monitor service "
                                "(uses FASHION_INFERENCE_ADDRESS and FASHION_BATCH_ADDRESS; server package)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = monitor_commands.add_parser("health",
                                    help="check every service and batch processing; exit 1 when a service is down")
    p.add_argument("--days", type=_positive_days, default=7, help="batch statistics window (default 7)")
    p.add_argument("--strict", action="store_true", help="exit 1 for warnings too (degraded services, low disks, "
                                                         "batch processing problems)")
    common(p)
    _command(p, "monitor:health")

    p = monitor_commands.add_parser("dashboard", help="write the monitoring report: text, PNG charts, HTML page")
    p.add_argument("--days", type=_positive_days, default=None, help="days shown by the charts (default 30)")
    p.add_argument("--text-only", action="store_true", help="only the text report, no charts")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="report folder (implies --embedded; default FASHION_REPORT_DIR, monitoring/reports)")
    common(p)
    _command(p, "monitor:dashboard")

    p = monitor_commands.add_parser("alerts", help="active alerts, their history and the rules")
    p.add_argument("--history", type=_limit, default=20, help="history entries shown (default 20)")
    p.add_argument("--rule", default="", help="only this rule")
    p.add_argument("--rules", action="store_true", help="also list the rules and their thresholds")
    common(p, embeddable=False)
    _command(p, "monitor:alerts")

    p = monitor_commands.add_parser("test-alert", help="send a test notification through the configured notifiers")
    p.add_argument("--channel", choices=("email", "slack"), default="", help="only this channel (default: all)")
    common(p)
    _command(p, "monitor:test_alert")
