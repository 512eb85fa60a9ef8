"""The Batch service process: fashion.v1.BatchService, health and reflection on one gRPC port;
Prometheus metrics on their own HTTP port; unfinished jobs resumed at start; scheduled runs."""

from __future__ import annotations

import asyncio
import logging
import sys

from fashion.v1 import batch_pb2 as pb
from fashion.v1 import batch_pb2_grpc as pb_grpc
from services.batch.events import JobEvents
from services.batch.jobs import JobQueue
from services.batch.runner import JobRunner, default_db_path
from services.batch.schedule import Schedule, ScheduledRuns
from services.batch.servicer import BatchServicer
from services.batch.store import JobStore
from services.common import metrics
from services.common import server as grpc_server
from services.common.config import BatchSettings, load_settings
from services.common.logs import setup_logging
from services.common.metrics import start_metrics_server
from services.common.security import metrics_token_check
from services.common.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

SERVICE_NAMES = (pb.DESCRIPTOR.services_by_name["BatchService"].full_name,)


async def serve(settings: BatchSettings | None = None) -> None:
    """Run the Batch service until SIGTERM/SIGINT."""
    settings = settings or BatchSettings()
    setup_logging(settings, "batch_service")
    schedule = Schedule.parse(settings.batch_schedule)  # a bad schedule stops the start, with the reason
    setup_tracing("fashion-batch")
    start_metrics_server("batch", settings.batch_metrics_port, settings.listen_host(settings.batch_host),
                         metrics_token_check(settings))

    settings.data_root.mkdir(parents=True, exist_ok=True)
    store = JobStore(default_db_path(settings))
    if (last := store.last_finished()) is not None and last.finished_at is not None:
        metrics.BATCH_LAST_RUN.set(last.finished_at)  # alerts on stale runs stay right across restarts
    events = JobEvents()
    queue = JobQueue(JobRunner(settings, store, events), settings.batch_max_concurrent_jobs,
                     settings.batch_history_days)
    server = grpc_server.create_server(settings, "batch", [
        (pb_grpc.add_BatchServiceServicer_to_server, BatchServicer(queue, events))])
    health = await grpc_server.add_health_and_reflection(server, SERVICE_NAMES, settings.reflection)
    address = settings.listen_address(settings.batch_host, settings.batch_port)
    await grpc_server.bind(server, settings, address, health)
    await server.start()
    await queue.start()
    scheduled = asyncio.ensure_future(ScheduledRuns(schedule, queue).run_forever()) if schedule else None
    await grpc_server.set_serving(health, SERVICE_NAMES, True)
    log.info("Batch service listening on %s: data root %s, jobs database %s, Inference service at %s, "
             "scheduled runs: %s", address, settings.data_root.resolve(), store.path, settings.inference_address,
             schedule.describe() if schedule else "off")

    async def on_stop() -> None:
        if scheduled is not None:
            scheduled.cancel()
        await queue.stop()
        store.close()
        shutdown_tracing()

    await grpc_server.serve_until_signal(server, health, settings.shutdown_grace_s, on_stop)


def main() -> None:
    settings = load_settings(BatchSettings)
    try:
        Schedule.parse(settings.batch_schedule)
    except ValueError as exc:  # say why before anything starts, and exit non-zero
        print(f"error: FASHION_BATCH_SCHEDULE: {exc}", file=sys.stderr)
        sys.exit(2)
    asyncio.run(serve(settings))
