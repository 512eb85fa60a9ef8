"""Dynamic batching: concurrent requests merged into one model run, each caller given exactly
its own rows back.

Semantics follow Triton's dynamic batcher: a batch starts when the engine is free and either
`max_batch_size` rows are waiting or the oldest waiting request has waited `max_delay`. With
max_delay 0 a lone request runs at once, and batches form from whatever arrived while the
previous batch was computing.

The contract (tested in tests/inference/test_batcher.py): `submit(rows)` resolves with exactly
`len(rows)` output rows, those computed from `rows`, in order, whatever else shares the batch.
Requests larger than `max_batch_size` are split into several runs and reassembled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from services.common import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """More images are waiting than max_queue_size allows."""


class BatcherClosed(RuntimeError):
    """The batcher is stopping and takes no new work."""


@dataclass(frozen=True)
class BatchTiming:
    """When a request's rows were queued, when their (last) batch ran, and its size."""

    queued_at: float
    started_at: float
    finished_at: float
    batch_size: int


class _Pending:
    __slots__ = ("future", "queued_at", "rows")

    def __init__(self, rows: np.ndarray, future: asyncio.Future[tuple[np.ndarray, BatchTiming]]) -> None:
        self.rows = rows
        self.future = future
        self.queued_at = time.perf_counter()


class DynamicBatcher:
    """Merges concurrent `submit` calls into runs of `run_batch` on a single engine thread."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int = 64,
                 max_delay_s: float = 0.0, max_queue_size: int = 4096, executor: Executor | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="onnx")
        self._owns_executor = executor is None
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="dynamic-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    async def submit(self, rows: np.ndarray) -> tuple[np.ndarray, BatchTiming]:
        """Queue `rows` (N, ...) and wait for their N output rows."""
        if self._closing:
            raise BatcherClosed("the inference engine is shutting down")
        n = len(rows)
        if n == 0:
            raise ValueError("nothing to infer: 0 rows")
        if self._queued_rows + n > self.max_queue_size:
            raise QueueFull(f"server overloaded: {self._queued_rows} images already waiting "
                            f"(max_queue_size {self.max_queue_size})")
        if n <= self.max_batch_size:
            return await self._enqueue(rows)
        parts = await asyncio.gather(*(self._enqueue(rows[i: i + self.max_batch_size])
                                       for i in range(0, n, self.max_batch_size)))
        timing = BatchTiming(min(t.queued_at for _, t in parts), min(t.started_at for _, t in parts),
                             max(t.finished_at for _, t in parts), max(t.batch_size for _, t in parts))
        return np.concatenate([out for out, _ in parts]), timing

    def _enqueue(self, rows: np.ndarray) -> asyncio.Future[tuple[np.ndarray, BatchTiming]]:
        future: asyncio.Future[tuple[np.ndarray, BatchTiming]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(rows, future))
        self._queued_rows += len(rows)
        metrics.QUEUE_DEPTH.set(self._queued_rows)
        self._arrived.set()
        return future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.max_delay_s > 0 and not self._closing:
                await self._wait_for_fuller_batch()
            batch = self._take_batch()
            if not batch:
                continue
            inputs = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run_batch, inputs)
            except Exception as exc:  # the whole batch failed: every caller in it gets the error
                log.exception("Batch of %d rows failed", len(inputs))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finished = time.perf_counter()
            self._deliver(batch, outputs, started, finished)

    async def _wait_for_fuller_batch(self) -> None:
        deadline = self._queue[0].queued_at + self.max_delay_s
        while self._queued_rows < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            p = self._queue[0]
            if batch and rows + len(p.rows) > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= len(p.rows)
            if p.future.done():  # caller gone (cancelled): don't compute for nobody
                continue
            batch.append(p)
            rows += len(p.rows)
        metrics.QUEUE_DEPTH.set(self._queued_rows)
        return batch

    def _deliver(self, batch: list[_Pending], outputs: np.ndarray, started: float, finished: float) -> None:
        total = sum(len(p.rows) for p in batch)
        if len(outputs) != total:
            exc = RuntimeError(f"model returned {len(outputs)} rows for a batch of {total}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        metrics.BATCH_SIZE.observe(total)
        metrics.COMPUTE_DURATION.observe(finished - started)
        offset = 0
        for p in batch:
            n = len(p.rows)
            metrics.QUEUE_DURATION.observe(started - p.queued_at)
            if not p.future.done():
                p.future.set_result((outputs[offset: offset + n], BatchTiming(p.queued_at, started, finished, total)))
            offset += n


class BatchingExecutor(Generic[T, R]):
    """Runs `fn(items)` on worker threads over every item waiting at that moment.

    A per-item `run_in_executor` costs two thread hand-offs per request; under load this runs
    one call per group of waiting items instead (up to `max_items`), with up to `workers` groups
    in parallel, and no added delay when idle. Used for image decoding ahead of the batcher.
    """

    def __init__(self, fn: Callable[[list[T]], list[R]], executor: Executor, *, workers: int = 2,
                 max_items: int = 64) -> None:
        self._fn = fn
        self._executor = executor
        self._workers = max(1, workers)
        self._max_items = max(1, max_items)
        self._pending: collections.deque[tuple[T, asyncio.Future[R]]] = collections.deque()
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._serve(), name=f"batching-executor-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        self._closing = True
        self._arrived.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []

    async def submit(self, item: T) -> R:
        if self._closing:
            raise BatcherClosed("shutting down")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._arrived.set()
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Share a burst between the workers so that large groups are processed in parallel.
            take = min(self._max_items, -(-len(self._pending) // self._workers))
            group = [self._pending.popleft() for _ in range(take)]
            group = [(item, fut) for item, fut in group if not fut.done()]
            if not group:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._fn, [item for item, _ in group])
            except Exception as exc:
                for _, fut in group:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(group, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
