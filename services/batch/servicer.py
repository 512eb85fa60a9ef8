"""fashion.v1.BatchService over gRPC: a thin adapter between protobuf and the JobQueue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from fashion.v1 import batch_pb2 as pb
from fashion.v1 import batch_pb2_grpc as pb_grpc
from services.batch import converters, health
from services.batch.events import JobEvents, JobUpdate
from services.batch.jobs import JobQueue
from services.batch.paths import FolderMissing, PathRefused
from services.batch.records import JobRecord
from services.batch.store import JobFinished, JobNotFound, KeyReused, StoreUnavailable
from services.common.server import ErrorStatuses

T = TypeVar("T")
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
MAX_STATS_DAYS = 366
WATCH_POLL_S = 2.0  # re-read the job when no event came (a job run by another process sends none here)


ERRORS = ErrorStatuses({
    (PathRefused, converters.UnknownValue): grpc.StatusCode.INVALID_ARGUMENT,
    (FolderMissing, JobNotFound): grpc.StatusCode.NOT_FOUND,
    KeyReused: grpc.StatusCode.ALREADY_EXISTS,
    JobFinished: grpc.StatusCode.FAILED_PRECONDITION,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
})


async def call(context: grpc.aio.ServicerContext, fn: Callable[[], T]) -> T:
    """Run blocking `fn` (the jobs database, file system) off the event loop; domain errors become statuses."""
    return await ERRORS.call(context, lambda: asyncio.to_thread(fn))


async def _required(context: grpc.aio.ServicerContext, value: str, name: str) -> str:
    if not value.strip():
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is required")
    return value.strip()


class BatchServicer(pb_grpc.BatchServiceServicer):
    """WatchJob sends the job, then an event per sorted image and per state change. A watcher that
    reads slower than images are sorted loses image events (never the last one, which ends the
    stream): the job does not wait for its watchers."""

    def __init__(self, queue: JobQueue, events: JobEvents) -> None:
        self._job_queue = queue
        self._events = events
        self._settings = queue.settings

    def _job(self, job: JobRecord) -> pb.Job:
        return converters.job_to_pb(job, self._settings)

    async def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        await _required(context, request.input_dir, "input_dir")
        spec = await call(context, lambda: self._job_queue.spec(
            request.input_dir, request.output_dir, converters.mode_of(request.mode),
            request.min_confidence if request.HasField("min_confidence") else None, request.recursive,
            request.idempotency_key))
        return self._job(await ERRORS.call(context, lambda: self._job_queue.submit(spec, trigger="api")))

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        job_id = await _required(context, request.job_id, "job_id")
        return self._job(await call(context, lambda: self._job_queue.get(job_id)))

    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        if not 0 <= request.limit <= MAX_LIST_LIMIT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"limit must be between 0 and {MAX_LIST_LIMIT}, got {request.limit}")
        jobs = await call(context, lambda: self._job_queue.list(request.limit or DEFAULT_LIST_LIMIT,
                                                                converters.state_of(request.state)))
        return pb.ListJobsResponse(jobs=[self._job(j) for j in jobs])

    async def WatchJob(self, request: pb.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.JobEvent]:
        job_id = await _required(context, request.job_id, "job_id")
        job = await call(context, lambda: self._job_queue.get(job_id))
        updates = self._events.subscribe(job.job_id)  # before the snapshot: nothing falls in between
        try:
            job = await asyncio.to_thread(self._job_queue.get, job.job_id)
            yield converters.event_to_pb(JobUpdate(job, message=job.state.value), self._settings)
            while not job.state.finished:
                try:  # wait_for costs a task per call: only when nothing is queued
                    update = updates.get_nowait() if not updates.empty() else await asyncio.wait_for(
                        updates.get(), WATCH_POLL_S)
                except TimeoutError:
                    latest = await asyncio.to_thread(self._job_queue.get, job.job_id)
                    if (latest.state, latest.counts.processed, latest.error) == (
                            job.state, job.counts.processed, job.error):
                        continue
                    update = JobUpdate(latest, message=latest.state.value)
                job = update.job
                yield converters.event_to_pb(update, self._settings)
        finally:
            self._events.unsubscribe(job.job_id, updates)

    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        job_id = await _required(context, request.job_id, "job_id")
        return self._job(await ERRORS.call(context, lambda: self._job_queue.cancel(job_id)))

    async def GetBatchStats(self, request: pb.GetBatchStatsRequest,
                            context: grpc.aio.ServicerContext) -> pb.BatchStats:
        if not 0 <= request.days <= MAX_STATS_DAYS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"days must be between 0 and {MAX_STATS_DAYS}, got {request.days}")
        history = await call(context, lambda: self._job_queue.history(request.days or 7))
        return converters.history_to_pb(history)

    async def GetBatchHealth(self, request: pb.GetBatchHealthRequest,
                             context: grpc.aio.ServicerContext) -> pb.BatchHealth:
        if not 0 <= request.days <= MAX_STATS_DAYS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"days must be between 0 and {MAX_STATS_DAYS}, got {request.days}")
        if request.HasField("max_age_hours") and not request.max_age_hours >= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"max_age_hours must be 0 or more, got {request.max_age_hours}")
        stats, failed = await call(context, lambda: self._job_queue.health_inputs(request.days or 7))
        return health.judge(converters.history_to_pb(stats), converters.job_to_pb(failed, self._job_queue.settings)
                            if failed is not None else None, self._job_queue.settings,
                            request.max_age_hours if request.HasField("max_age_hours") else None)
