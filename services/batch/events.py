"""Progress of running jobs, for WatchJob streams and the CLI's progress bar (in-process pub/sub)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass

from services.batch.records import JobRecord

QUEUE_SIZE = 4096


@dataclass(frozen=True)
class FileUpdate:
    filename: str
    category: str
    confidence: float
    status: str
    """success, uncertain, failed or skipped."""
    destination: str
    """Relative to the data root: where the file now is."""
    error: str = ""


@dataclass(frozen=True)
class JobUpdate:
    job: JobRecord
    files: tuple[FileUpdate, ...] = ()
    """The files of one sorted group, in order; empty on updates about the job itself."""
    message: str = ""


class JobEvents:
    """Subscribers get every update of one job. A subscriber that falls behind loses file updates,
    never the job's final state (each update carries the whole job, counts included)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[JobUpdate]]] = defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Queue[JobUpdate]:
        queue: asyncio.Queue[JobUpdate] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[JobUpdate]) -> None:
        subscribers = self._subscribers.get(job_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[job_id]

    def watched(self, job_id: str) -> bool:
        return bool(self._subscribers.get(job_id))

    def publish(self, update: JobUpdate) -> None:
        for queue in self._subscribers.get(update.job.job_id, ()):
            if queue.full():
                if update.files and not update.job.state.finished:
                    continue
                queue.get_nowait()  # make room for a state change
            queue.put_nowait(update)
