"""Dynamic batching: concurrent requests merged into one model run, each caller given exactly
its own rows back.

Semantics follow Triton's dynamic batcher: a batch starts when the engine is free and either
`max_batch_size` rows are waiting or the oldest waiting request has waited `max_delay`. With
max_delay 0 a lone request runs at once, and batches form from whatever arrived while the
previous batch was computing.

Requests are preprocessed tensors (`submit`, e.g. KServe ModelInfer) or encoded images
(`submit_encoded`). Where the worker processes (`workers`, a WorkerPool: services/inference/workers/) run the
model, the CPU default, a batch goes to them whole from the event loop and comes back as the
model's outputs: no thread of this process takes part; except a lone request of one row with
nothing else queued or in flight (one user at a time), which runs here: there the round trip to a
worker process costs more than the model run, and when it is small (a tensor row, an image of a few
KiB) it runs on the event loop itself, without the engine thread's two hand-offs. Otherwise an
engine thread runs the model here, one thread hand-off per batch, not two per image (a decoding
stage of its own would add hand-offs contending with the event loop for the GIL); the batch's
images were decoded by workers that only decode, or, for a lone image or without workers, by the
engine thread itself with `prepare`.
Two batches may be in flight, one per slot (a task taking batches from the queue). With workers
that run the model, one in each worker, the second starting as soon as anything waits.
Otherwise one decodes while the other is in the model, whose runs in this process are
serialized (ONNX Runtime releases the GIL and uses every core for one run), and the second only
starts when full, so that a stream of single images still forms large batches.

The contract (tested in tests/inference/test_batcher.py): `submit(rows)` resolves with exactly
`len(rows)` output rows, those computed from `rows`, in order, whatever else shares the batch;
`submit_encoded(image)` with the one row computed from that image, or the error `prepare`
raised for it alone. Requests larger than `max_batch_size` are split and reassembled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.common import metrics
from services.inference.decoding import (
    Decoded,
    Item,
    concat,
    decode_images,
    encoded_images,
    model_inputs,
    request_errors,
)

log = logging.getLogger(__name__)
IN_FLIGHT = 2  # batches being decoded or run at once, one per slot
INLINE_IMAGE_BYTES = 4096
"""The largest encoded image a lone request has decoded on the event loop (a Fashion-MNIST PNG is under
1 KiB; a 4 KiB PNG can still inflate to a few megapixels, a few milliseconds of decoding)."""

Result = tuple[np.ndarray, "BatchTiming"]


class Workers(Protocol):
    """What the batcher needs of a WorkerPool."""

    @property
    def runs_model(self) -> bool: ...

    async def run(self, items: Sequence[Item]) -> Decoded: ...


class Refused(Exception):
    """A request turned away before any work was done on it (nothing decoded, nothing run)."""


class QueueFull(Refused, RuntimeError):
    """More images are waiting than max_queue_size allows."""


class BatcherClosed(Refused, RuntimeError):
    """The batcher is stopping and takes no new work."""


class RequestTooLarge(Refused, ValueError):
    """One request has more images (rows) than max_queue_size: it could never be queued, however idle
    the server, so it is the request's fault (INVALID_ARGUMENT), not the server's load (QueueFull)."""


@dataclass(frozen=True)
class BatchTiming:
    """When a request was queued, when its (last) batch started, finished decoding its images
    and finished, and how many rows that batch had."""

    queued_at: float
    started_at: float
    decoded_at: float
    finished_at: float
    batch_size: int


class _Pending:
    __slots__ = ("data", "future", "queued_at", "rows")

    def __init__(self, data: Item, future: asyncio.Future[_Outcome]) -> None:
        self.data = data  # preprocessed rows, or encoded images
        self.rows = len(data)
        self.future = future
        self.queued_at = time.perf_counter()


@dataclass
class _Outcome:
    """A request's share of a batch: the rows of its usable inputs, in order, and why the others
    (encoded images, by position) could not be used."""

    outputs: np.ndarray
    errors: dict[int, Exception]
    timing: BatchTiming


@dataclass
class _BatchRun:
    """One batch's results, from an engine thread or a worker."""

    outputs: np.ndarray | None
    errors: list[dict[int, Exception]]  # per request: image position -> why it could not be used
    started: float
    decoded: float
    finished: float


class DynamicBatcher:
    """Merges concurrent `submit`/`submit_encoded` calls into model runs: in the `workers` where
    they run the model, else of `run_batch` on an engine thread."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], *,
                 prepare: Callable[[bytes], np.ndarray] | None = None,
                 workers: Workers | None = None, max_batch_size: int = 64,
                 max_delay_s: float = 0.0, max_queue_size: int = 4096, executor: Executor | None = None,
                 on_batch: Callable[[int, float, float], None] | None = None) -> None:
        """`on_batch(rows, input_s, infer_s)` is told of every model run: its rows, how long their
        images took to decode and how long the model took."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if workers is not None and not workers.runs_model and prepare is None:
            raise ValueError("a batcher with decoding workers needs prepare too: lone images are decoded "
                             "on the engine thread")
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._prepare = prepare
        self._workers = workers
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._executor = executor or ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="onnx")
        self._owns_executor = executor is None
        self._model_lock = threading.Lock()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_rows = 0
        # Whole batches go to workers that run the model; such batches may start beside each other
        # whatever their size.
        self._batches_in_workers = workers is not None and workers.runs_model
        self._wakeups = [asyncio.Event() for _ in range(IN_FLIGHT)]  # one per slot
        self._sleeping = [False] * IN_FLIGHT
        self._in_flight = 0  # batches being decoded or run
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def queue_depth(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._serve(i), name=f"dynamic-batcher-{i}") for i in range(IN_FLIGHT)]

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        for wakeup in self._wakeups:
            wakeup.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []
        if self._owns_executor:
            self._executor.shutdown(wait=False)

    async def submit(self, rows: np.ndarray) -> Result:
        """Queue preprocessed `rows` (N, ...) and wait for their N output rows."""
        if len(rows) == 0:
            raise ValueError("nothing to infer: 0 rows")
        outcomes = await self._submit_chunks(rows)
        if len(outcomes) == 1:
            return outcomes[0].outputs, outcomes[0].timing
        return np.concatenate([o.outputs for o in outcomes]), _merged_timing(outcomes)

    async def submit_encoded(self, image: bytes) -> Result:
        """One encoded image: its output row (1, classes), or the error `prepare` raised for it."""
        if self._prepare is None and self._workers is None:
            raise TypeError("this batcher can not decode images: it has no prepare function nor workers")
        self._admit(1)  # the per-request hot path of Classify: no chunking, no gather
        outcome = await self._enqueue([image])
        if outcome.errors:
            raise outcome.errors[0]
        return outcome.outputs, outcome.timing

    async def submit_encoded_many(self, images: Sequence[bytes]) -> tuple[list[np.ndarray | Exception], BatchTiming]:
        """Many encoded images: per image its output row (1, classes) or its error, in order."""
        if self._prepare is None and self._workers is None:
            raise TypeError("this batcher can not decode images: it has no prepare function nor workers")
        if not images:
            raise ValueError("nothing to infer: 0 images")
        outcomes = await self._submit_chunks(list(images))
        results: list[np.ndarray | Exception] = []
        for k, o in enumerate(outcomes):
            rows = iter(o.outputs)
            size = min(self.max_batch_size, len(images) - k * self.max_batch_size)
            results.extend(o.errors[j] if j in o.errors else next(rows)[None] for j in range(size))
        return results, _merged_timing(outcomes)

    async def _submit_chunks(self, data: Item) -> list[_Outcome]:
        """Queue `data` in pieces of at most max_batch_size; their outcomes, in order."""
        self._admit(len(data))
        step = self.max_batch_size
        if len(data) <= step:  # the common case: no gather on the per-request path
            return [await self._enqueue(data)]
        futures = [self._enqueue(data[i: i + step]) for i in range(0, len(data), step)]
        return list(await asyncio.gather(*futures))

    def _admit(self, n: int) -> None:
        if self._closing:
            raise BatcherClosed("the inference engine is shutting down")
        if n > self.max_queue_size:
            raise RequestTooLarge(f"request has {n} images; at most {self.max_queue_size} (the server's "
                                  f"max_queue_size) fit in one request: split it into requests of at most "
                                  f"{self.max_queue_size} images")
        if self._queued_rows + n > self.max_queue_size:
            raise QueueFull(f"server overloaded: {self._queued_rows} images already waiting "
                            f"(max_queue_size {self.max_queue_size})")

    def _enqueue(self, data: Item) -> asyncio.Future[_Outcome]:
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        pending = _Pending(data, future)
        self._queue.append(pending)
        self._queued_rows += pending.rows
        metrics.QUEUE_DEPTH.set(self._queued_rows)
        # Wake one sleeping slot that would take the queue as it is: waking every slot for
        # each request costs every request a wasted wake-up.
        for slot, sleeping in enumerate(self._sleeping):
            if sleeping and self._would_take(slot):
                self._sleeping[slot] = False
                self._wakeups[slot].set()
                break
        return future

    def _would_take(self, slot: int) -> bool:
        """Whether `slot` starts a batch from the queue as it is. Where batches share this
        process's model, the second slot only takes full batches: while the first is busy,
        small requests gather into the next batch instead of being split between two smaller runs
        that take turns anyway."""
        return bool(self._queue) and (slot == 0 or self._batches_in_workers or self._queued_rows >= self.max_batch_size)

    async def _sleep(self, slot: int) -> None:
        """Until `_enqueue` or `stop` wakes this slot."""
        wakeup = self._wakeups[slot]
        wakeup.clear()
        self._sleeping[slot] = True
        try:
            await wakeup.wait()
        finally:
            self._sleeping[slot] = False

    async def _serve(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._would_take(slot):
                if self._closing and (slot > 0 or not self._queue):
                    return
                await self._sleep(slot)
                continue
            if self.max_delay_s > 0 and not self._closing:
                await self._wait_for_fuller_batch(slot)
            batch = self._take_batch()
            if not batch:
                continue
            items = [p.data for p in batch]
            self._in_flight += 1
            try:
                if self._batches_in_workers and not self._alone(batch):
                    run = await self._run_in_worker(items)
                else:
                    started = time.perf_counter()
                    decoded = None
                    if self._workers is not None and len(encoded := encoded_images(items)) > 1:
                        # A lone image is decoded on the engine thread: the round trip to a worker
                        # costs more than the GIL contention it saves when nothing else is waiting.
                        decoded = _observed(await self._workers.run([encoded]))
                    if self._alone(batch) and _small(items[0]):
                        run = self._run(items, decoded, started)  # here, on the event loop: no thread hand-off
                    else:
                        run = await loop.run_in_executor(self._executor, self._run, items, decoded, started)
            except Exception as exc:  # the whole batch failed: every caller in it gets the error
                log.exception("Batch of %d requests failed", len(batch))
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self._in_flight -= 1
            self._deliver(batch, run)

    def _alone(self, batch: list[_Pending]) -> bool:
        """Whether `batch` is one request of one row with nothing else queued or in flight (one user at a
        time): run in this process, it skips the round trip to a worker process, and when small (_small)
        the hand-off to the engine thread too."""
        return (len(batch) == 1 and batch[0].rows == 1 and not self._queue and self._in_flight == 1
                and (self._prepare is not None or isinstance(batch[0].data, np.ndarray)))

    async def _run_in_worker(self, items: list[Item]) -> _BatchRun:
        """The whole batch through a worker that decodes its images and runs the model."""
        assert self._workers is not None
        started = time.perf_counter()
        decoded = _observed(await self._workers.run(items))
        finished = time.perf_counter()
        decoded_at = max(started, finished - (decoded.compute_s or 0.0))
        return _BatchRun(decoded.rows, request_errors(items, decoded.errors), started, decoded_at, finished)

    def _run(self, items: list[Item], decoded: Decoded | None, started: float) -> _BatchRun:
        """On an engine thread: decode the batch's images unless `decoded` already, then one model
        run over every row."""
        if decoded is None and (encoded := encoded_images(items)):
            assert self._prepare is not None
            decoded = _observed(decode_images(self._prepare, encoded))
        errors = request_errors(items, decoded.errors if decoded is not None else {})
        pieces = model_inputs(items, decoded.rows if decoded is not None else None, errors)
        with self._model_lock:  # the other batch in flight may decode meanwhile, not run
            decoded_at = time.perf_counter()
            outputs = None if not pieces else self._run_batch(concat(pieces))
        return _BatchRun(outputs, errors, started, decoded_at, time.perf_counter())

    async def _wait_for_fuller_batch(self, slot: int) -> None:
        deadline = self._queue[0].queued_at + self.max_delay_s
        while self._queue and self._queued_rows < self.max_batch_size and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._sleep(slot)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            p = self._queue[0]
            if batch and rows + p.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= p.rows
            if p.future.done():  # caller gone (cancelled): don't compute for nobody
                continue
            batch.append(p)
            rows += p.rows
        metrics.QUEUE_DEPTH.set(self._queued_rows)
        return batch

    def _deliver(self, batch: list[_Pending], run: _BatchRun) -> None:
        usable = [p.rows - len(errs) for p, errs in zip(batch, run.errors, strict=True)]
        total = sum(usable)
        produced = 0 if run.outputs is None else len(run.outputs)
        if produced != total:
            exc = RuntimeError(f"model returned {produced} rows for a batch of {total}")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if total:
            metrics.BATCH_SIZE.observe(total)
            metrics.COMPUTE_DURATION.observe(run.finished - run.decoded)
            if self._on_batch is not None:
                self._on_batch(total, run.decoded - run.started, run.finished - run.decoded)
        offset = 0
        empty = np.zeros((0, 0), np.float32)
        for p, n, errs in zip(batch, usable, run.errors, strict=True):
            metrics.QUEUE_DURATION.observe(run.started - p.queued_at)
            if not p.future.done():
                timing = BatchTiming(p.queued_at, run.started, run.decoded, run.finished, total)
                outputs = run.outputs[offset: offset + n] if run.outputs is not None else empty
                p.future.set_result(_Outcome(outputs, errs, timing))
            offset += n


def _small(item: Item) -> bool:
    """A tensor row, or an encoded image of at most INLINE_IMAGE_BYTES: run on the event loop itself when
    alone, since its decoding (bounded by the file's size) and one-row model run cost less than the two
    thread hand-offs of the engine thread, and nothing else is waiting meanwhile."""
    return isinstance(item, np.ndarray) or len(item[0]) <= INLINE_IMAGE_BYTES


def _observed(decoded: Decoded) -> Decoded:
    for took in decoded.took:
        metrics.DECODE_DURATION.observe(took)
    return decoded


def _merged_timing(outcomes: list[_Outcome]) -> BatchTiming:
    """One timing for a request whose pieces ran in several batches: first start, last end."""
    if len(outcomes) == 1:
        return outcomes[0].timing
    t = [o.timing for o in outcomes]
    return BatchTiming(min(x.queued_at for x in t), min(x.started_at for x in t), max(x.decoded_at for x in t),
                       max(x.finished_at for x in t), max(x.batch_size for x in t))
