"""The Batch service process: fashion.v1.BatchService (health and reflection beside it) on one gRPC
port, Prometheus metrics on their own HTTP port; unfinished jobs resumed at start; scheduled runs.
The process around it is services.common.bootstrap's."""

from __future__ import annotations

import asyncio
import logging

from fashion.v1 import batch_pb2_grpc as pb_grpc
from services.batch.events import JobEvents
from services.batch.jobs import JobQueue
from services.batch.paths import check_log_dir_outside
from services.batch.runner import JobRunner
from services.batch.schedule import Schedule, ScheduledRuns
from services.batch.servicer import BatchServicer
from services.batch.store import StoreUnavailable, open_job_store
from services.common import metrics
from services.common.bootstrap import GrpcService, Listener, ServiceParts, StartupError, run
from services.common.config import BatchSettings

log = logging.getLogger(__name__)


def check(settings: BatchSettings) -> None:
    """A bad schedule, an unreadable FASHION_BATCH_DATABASE_URL_FILE or logs inside the data root stop the
    start, with the reason."""
    try:
        Schedule.parse(settings.batch_schedule)
    except ValueError as exc:
        raise StartupError(f"FASHION_BATCH_SCHEDULE: {exc}") from exc
    try:
        settings.batch_database_url_value()
        check_log_dir_outside(settings.data_root, settings.log_dir)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


class BatchParts(ServiceParts):
    """The job queue and its database; at start, unfinished jobs resume and scheduled runs begin."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self.schedule = Schedule.parse(settings.batch_schedule)
        settings.data_root.mkdir(parents=True, exist_ok=True)
        try:
            self.store = open_job_store(settings)
        except StoreUnavailable as exc:  # the reason, never the password; the orchestrator starts it again
            log.error("Batch service cannot start: %s", exc)
            raise SystemExit(1) from None
        if (last := self.store.last_finished()) is not None and last.finished_at is not None:
            metrics.BATCH_LAST_RUN.set(last.finished_at)  # alerts on stale runs stay right across restarts
        events = JobEvents()
        self.queue = JobQueue(JobRunner(settings, self.store, events), settings.batch_max_concurrent_jobs,
                              settings.batch_history_days)
        self.servicers = [(pb_grpc.add_BatchServiceServicer_to_server, BatchServicer(self.queue, events))]
        self.scheduled: asyncio.Future[None] | None = None

    def describe(self) -> str:
        return (f"data root {self.settings.data_root.resolve()}, jobs database {self.store.describe()}, "
                f"Inference service at {self.settings.inference_address}, scheduled runs: "
                f"{self.schedule.describe() if self.schedule else 'off'}")

    async def start(self) -> None:
        await self.queue.start()
        if self.schedule:
            self.scheduled = asyncio.ensure_future(ScheduledRuns(self.schedule, self.queue).run_forever())

    async def stop(self) -> None:
        if self.scheduled is not None:
            self.scheduled.cancel()
        await self.queue.stop()
        self.store.close()


SERVICE = GrpcService(
    name="batch", settings_class=BatchSettings, log_name="batch_service",
    listener=lambda s: Listener(s.batch_host, s.batch_port, s.batch_metrics_port),
    build=BatchParts, check=check,
)


def main() -> None:
    run(SERVICE)
