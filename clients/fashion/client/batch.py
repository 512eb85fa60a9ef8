"""Clients of the Batch service (fashion.v1.BatchService), sync and asyncio.

    from fashion.client import BatchClient
    with BatchClient("localhost:50052") as batch:
        job = batch.submit("inbox")
        for event in batch.watch(job.job_id):
            print(event.job.processed, "/", event.job.total)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc

from fashion.client._base import AsyncServiceClient, ServiceClient
from fashion.client._channel import ChannelOptions
from fashion.v1 import batch_pb2 as pb
from fashion.v1 import batch_pb2_grpc as pb_grpc

SERVICE = "fashion.v1.BatchService"
MODES = {"": pb.TRANSFER_MODE_UNSPECIFIED, "move": pb.TRANSFER_MODE_MOVE, "copy": pb.TRANSFER_MODE_COPY}
FINISHED = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
RECONNECT_S = 300.0
"""How long `follow` and `wait` wait for a Batch service that went away (a restart) to answer again."""
RECONNECT_POLL_S = 1.0
CALL_KEY_PREFIX = "call-"
"""The idempotency key a submission without one gets: this prefix and a random UUID."""


def submit_request(input_dir: str, mode: str = "", min_confidence: float | None = None, recursive: bool = False,
                   output_dir: str = "", idempotency_key: str = "") -> pb.SubmitJobRequest:
    """`mode` is "move", "copy" or "" (the server's default); folders are relative to the server's data root.
    Without an `idempotency_key` the request gets one of its own: the channel retries a call that failed
    UNAVAILABLE, also one the server carried out before the connection broke, and the key makes that retry
    return the job it made instead of starting a second."""
    if mode not in MODES:
        raise ValueError(f"mode must be move or copy, got {mode!r}")
    req = pb.SubmitJobRequest(input_dir=input_dir, mode=MODES[mode], recursive=recursive, output_dir=output_dir,
                              idempotency_key=idempotency_key or f"{CALL_KEY_PREFIX}{uuid.uuid4().hex}")
    if min_confidence is not None:
        req.min_confidence = min_confidence
    return req


def state_name(state: int) -> str:
    """JOB_STATE_SUCCEEDED -> "SUCCEEDED"."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


class BatchClient(ServiceClient[pb_grpc.BatchServiceStub]):
    """Blocking client. Errors raise grpc.RpcError with the server's status code and message
    (INVALID_ARGUMENT for paths outside the data root, NOT_FOUND for unknown jobs, ...)."""

    def __init__(self, address: str | ChannelOptions = "localhost:50052") -> None:
        super().__init__(address, pb_grpc.BatchServiceStub)

    def submit(self, input_dir: str, mode: str = "", min_confidence: float | None = None, recursive: bool = False,
               output_dir: str = "", idempotency_key: str = "", timeout_s: float | None = None) -> pb.Job:
        req = submit_request(input_dir, mode, min_confidence, recursive, output_dir, idempotency_key)
        return self._stub.SubmitJob(req, **self._kw(timeout_s))

    def get(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        return self._stub.GetJob(pb.GetJobRequest(job_id=job_id), **self._kw(timeout_s))

    def list(self, limit: int = 0, state: int = pb.JOB_STATE_UNSPECIFIED,
             timeout_s: float | None = None) -> list[pb.Job]:
        return list(self._stub.ListJobs(pb.ListJobsRequest(limit=limit, state=state), **self._kw(timeout_s)).jobs)

    def watch(self, job_id: str, timeout_s: float | None = None) -> Iterator[pb.JobEvent]:
        """The job's current state, then its events until it ends. No deadline unless `timeout_s`."""
        return self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout_s,
                                   metadata=self.options.metadata)

    def cancel(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        return self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id), **self._kw(timeout_s))

    def stats(self, days: int = 0, timeout_s: float | None = None) -> pb.BatchStats:
        return self._stub.GetBatchStats(pb.GetBatchStatsRequest(days=days), **self._kw(timeout_s))

    def batch_health(self, days: int = 0, max_age_hours: float | None = None,
                     timeout_s: float | None = None) -> pb.BatchHealth:
        """The batch processing health check as the Batch service judges it."""
        return self._stub.GetBatchHealth(pb.GetBatchHealthRequest(days=days, max_age_hours=max_age_hours),
                                         **self._kw(timeout_s))

    def follow(self, job_id: str, reconnect_s: float = RECONNECT_S,
               on_lost: Callable[[grpc.RpcError], None] = lambda exc: None) -> Iterator[pb.JobEvent]:
        """The job's current state, then its events until it ends, across restarts of the Batch service (a
        crash, a rolling update): when the stream breaks (UNAVAILABLE) `on_lost` is told, the job is asked for
        every RECONNECT_POLL_S until the service answers (an event with the job as it is then; after
        `reconnect_s` the last error is raised), and watched again."""
        while True:
            try:
                yield from self.watch(job_id)  # the server closes the stream after the job's last event
                return
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                on_lost(exc)
            yield pb.JobEvent(job=self._answered(job_id, reconnect_s))

    def _answered(self, job_id: str, reconnect_s: float) -> pb.Job:
        deadline = time.monotonic() + reconnect_s
        while True:
            try:
                return self.get(job_id, timeout_s=RECONNECT_POLL_S)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                        or time.monotonic() >= deadline:
                    raise
            time.sleep(RECONNECT_POLL_S)

    def wait(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        """Block until the job ends (across restarts of the Batch service, as `follow`); its final state.
        `timeout_s`: at most this long in all (DEADLINE_EXCEEDED)."""
        job = self.get(job_id)
        if timeout_s is None:
            for event in self.follow(job_id):
                job = event.job
            return job
        for event in self.watch(job_id, timeout_s):
            job = event.job
        return job


class AsyncBatchClient(AsyncServiceClient[pb_grpc.BatchServiceStub]):
    """asyncio client with the same methods as BatchClient, awaitable."""

    def __init__(self, address: str | ChannelOptions = "localhost:50052") -> None:
        super().__init__(address, pb_grpc.BatchServiceStub)

    async def submit(self, input_dir: str, mode: str = "", min_confidence: float | None = None,
                     recursive: bool = False, output_dir: str = "", idempotency_key: str = "",
                     timeout_s: float | None = None) -> pb.Job:
        req = submit_request(input_dir, mode, min_confidence, recursive, output_dir, idempotency_key)
        return await self._stub.SubmitJob(req, **self._kw(timeout_s))

    async def get(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        return await self._stub.GetJob(pb.GetJobRequest(job_id=job_id), **self._kw(timeout_s))

    async def list(self, limit: int = 0, state: int = pb.JOB_STATE_UNSPECIFIED,
                   timeout_s: float | None = None) -> list[pb.Job]:
        resp = await self._stub.ListJobs(pb.ListJobsRequest(limit=limit, state=state), **self._kw(timeout_s))
        return list(resp.jobs)

    async def watch(self, job_id: str, timeout_s: float | None = None) -> AsyncIterator[pb.JobEvent]:
        call = self._stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout_s,
                                   metadata=self.options.metadata)
        async for event in call:
            yield event

    async def cancel(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        return await self._stub.CancelJob(pb.CancelJobRequest(job_id=job_id), **self._kw(timeout_s))

    async def stats(self, days: int = 0, timeout_s: float | None = None) -> pb.BatchStats:
        return await self._stub.GetBatchStats(pb.GetBatchStatsRequest(days=days), **self._kw(timeout_s))

    async def batch_health(self, days: int = 0, max_age_hours: float | None = None,
                           timeout_s: float | None = None) -> pb.BatchHealth:
        """The batch processing health check as the Batch service judges it."""
        return await self._stub.GetBatchHealth(pb.GetBatchHealthRequest(days=days, max_age_hours=max_age_hours),
                                               **self._kw(timeout_s))

    async def wait(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        job = await self.get(job_id)
        async for event in self.watch(job_id, timeout_s):  # the server closes the stream after the job's last event
            job = event.job
        return job


__all__ = ["FINISHED", "SERVICE", "AsyncBatchClient", "BatchClient", "state_name", "submit_request"]
