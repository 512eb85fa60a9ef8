"""The Inference service's data plane: decode, batch, infer, rank, count.

Transport-free: the fashion.v1 servicer, the KServe V2 servicer and the benchmarks all call
this one object, so behaviour and statistics are the same whichever protocol a client speaks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from opentelemetry import trace

from services.common import metrics, tracing
from services.common.config import InferenceSettings
from services.inference.batcher import IN_FLIGHT, BatchTiming, DynamicBatcher, Refused
from services.inference.cpus import process_cpus, server_processes
from services.inference.engine import CPU, OnnxModel, choose_providers
from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.model import ModelManifest
from services.inference.siblings import STARTED_ENV, Siblings
from services.inference.statistics import ModelStatistics
from services.inference.workers.pool import WorkerPool
from services.inference.workers.wire import WorkerModel

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


class ModelNotReady(RuntimeError):
    """No model is loaded (yet, or it failed to load)."""


class TensorRejected(ValueError):
    """A raw input tensor does not fit the model's input."""


@dataclass(frozen=True)
class Classification:
    """One image's result: the top-k (index, label, confidence), best first."""

    top_k: tuple[tuple[int, str, float], ...]
    uncertain: bool
    latency_ms: float

    @property
    def category(self) -> str:
        return self.top_k[0][1]

    @property
    def confidence(self) -> float:
        return self.top_k[0][2]


COUNTERS = ("total_requests", "total_images_processed", "successful_predictions", "failed_predictions",
            "latency_total_s")
"""The ServiceStats fields that server processes sharing a port add up (services.inference.siblings)."""
MODEL_STATISTICS = "model_statistics"
"""Where a server process's ModelStatistics are in what it publishes to its siblings."""


@dataclass
class ServiceStats:
    """Counters behind GetStats (the REST API's /stats)."""

    started: float = field(default_factory=time.monotonic)
    total_requests: int = 0
    total_images_processed: int = 0
    successful_predictions: int = 0
    failed_predictions: int = 0
    latency_total_s: float = 0.0

    def record(self, succeeded: int, failed: int, latency_s: float, requests: int = 1) -> None:
        self.total_requests += requests
        self.total_images_processed += succeeded + failed
        self.successful_predictions += succeeded
        self.failed_predictions += failed
        self.latency_total_s += latency_s
        if succeeded:
            metrics.IMAGES_PROCESSED.labels("success").inc(succeeded)
        if failed:
            metrics.IMAGES_PROCESSED.labels("failed").inc(failed)

    def counters(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COUNTERS}

    def snapshot(self, others: Sequence[Mapping[str, float]] = ()) -> dict[str, object]:
        """The guide's /stats fields; with `others` (sibling processes' counters()), of them all: counts
        summed, the success rate from the sums, the average latency weighted by requests."""
        sums = self.counters()
        for other in others:
            for name in COUNTERS:
                sums[name] += other.get(name, 0)
        requests, succeeded = int(sums["total_requests"]), int(sums["successful_predictions"])
        failed = int(sums["failed_predictions"])
        uptime = int(time.monotonic() - self.started)
        processed = succeeded + failed
        rate = 100.0 if processed == 0 else round(100.0 * succeeded / processed, 2)
        return {
            "uptime_seconds": uptime,
            "uptime_human": str(timedelta(seconds=uptime)),
            "total_requests": requests,
            "total_images_processed": int(sums["total_images_processed"]),
            "successful_predictions": succeeded,
            "failed_predictions": failed,
            "success_rate": rate,
            "timestamp": datetime.now().replace(microsecond=0).isoformat(),
            "average_latency_ms": 1000 * sums["latency_total_s"] / requests if requests else 0.0,
        }


class Classifier:
    """Loads the model, then classifies encoded images and raw tensors through the batcher."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.stats = ServiceStats()
        self.siblings = Siblings.from_environment(server_processes(settings), self._published_statistics,
                                                  lambda: self.ready)
        """The other server processes on this port (FASHION_INFERENCE_PROCESSES), None when alone."""
        if self.siblings is not None and (started := os.environ.get(STARTED_ENV)):
            self.stats.started = time.monotonic() - max(0.0, time.time() - float(started))  # the service's
        self.statistics = ModelStatistics()
        """Triton-style per-request timings and model runs (KServe ModelStatistics)."""
        self.manifest: ModelManifest | None = None
        self.model: OnnxModel | None = None
        self.load_error: str | None = None
        self._batcher: DynamicBatcher | None = None
        self._workers: WorkerPool | None = None
        self._labels: tuple[str, ...] = ()
        self.min_confidence = 0.0

    @property
    def ready(self) -> bool:
        return self._batcher is not None

    async def load(self) -> None:
        """Load the model folder and run one warm-up inference; raises on failure (and records why)."""
        try:
            manifest = await asyncio.to_thread(ModelManifest.load, self.settings.model_dir)
            model = await asyncio.to_thread(self._open_model, manifest)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.critical("Model load failed from %s: %s", self.settings.model_dir, self.load_error)
            raise
        self.manifest, self.model = manifest, model
        self._labels = manifest.labels
        self.min_confidence = (self.settings.min_confidence if self.settings.min_confidence is not None
                               else manifest.min_confidence)
        pre = Preprocessor.from_manifest(manifest, max_pixels=self.settings.max_image_pixels)
        processes = self._worker_processes()
        if processes:
            worker_model = None
            if self._workers_run_model(model.provider):
                # The bytes this process loaded: a worker restarted later runs the same model, never a file
                # replaced since (new labels, another version) or one now truncated.
                worker_model = WorkerModel(manifest, max(1, self._intra_op_threads() // processes), model.onnx)
            self._workers = await WorkerPool.open(pre, processes, worker_model, nice=self.settings.worker_nice)
        self._batcher = DynamicBatcher(model.run, prepare=pre, workers=self._workers,
                                       max_batch_size=self.settings.max_batch_size,
                                       max_delay_s=self.settings.max_delay_ms / 1000,
                                       max_queue_size=self.settings.max_queue_size,
                                       on_batch=self.statistics.record_execution)
        self._batcher.start()
        metrics.MODEL_LOADED.labels(manifest.name).set(1)
        self.load_error = None

    def _worker_processes(self) -> int:
        processes = self.settings.worker_processes
        return processes if processes >= 0 else IN_FLIGHT if process_cpus(self.settings) >= 2 else 0

    def _workers_run_model(self, provider: str) -> bool:
        return self._worker_processes() > 0 and self.settings.workers_run_model and provider == CPU

    def _intra_op_threads(self) -> int:
        return self.settings.intra_op_threads or process_cpus(self.settings)

    def _open_model(self, manifest: ModelManifest) -> OnnxModel:
        threads = self._intra_op_threads()
        if self._workers_run_model(choose_providers(self.settings.execution_provider)[0]):
            # The workers run every batch; this process's session only runs lone one-row requests (the
            # batcher's one user at a time), where one thread answers sooner than a pool of them.
            threads = 1
        model = OnnxModel(manifest, self.settings.execution_provider, threads, self.settings.inter_op_threads,
                          cuda_batch=self.settings.max_batch_size)
        model.warm_up()
        return model

    async def close(self) -> None:
        if self._batcher is not None:
            batcher, self._batcher = self._batcher, None
            await batcher.stop()
        if self._workers is not None:
            workers, self._workers = self._workers, None
            await workers.close()
        if self.manifest is not None:
            metrics.MODEL_LOADED.labels(self.manifest.name).set(0)

    async def stats_snapshot(self) -> dict[str, object]:
        """GetStats' fields: this process's counters, summed with its siblings' when it has some."""
        return self.stats.snapshot(await self.siblings.others() if self.siblings is not None else ())

    async def statistics_snapshot(self) -> ModelStatistics:
        """KServe ModelStatistics: this process's, summed with its siblings' when it has some."""
        if self.siblings is None:
            return self.statistics
        others = await self.siblings.others()
        return self.statistics.summed(ModelStatistics.from_json(other[MODEL_STATISTICS])
                                      for other in others if MODEL_STATISTICS in other)

    def _published_statistics(self) -> dict[str, Any]:
        """What this process publishes to its siblings: its GetStats counters and its ModelStatistics."""
        return {**self.stats.counters(), MODEL_STATISTICS: self.statistics.to_json()}

    def _require(self) -> DynamicBatcher:
        if self._batcher is None:
            raise ModelNotReady((self.load_error and f"model failed to load: {self.load_error}")
                                or "model is loading; retry shortly")
        return self._batcher

    def clamp_top_k(self, top_k: int) -> int:
        """The requested k, or the default for 0, within [1, number of classes]."""
        return max(1, min(top_k or self.settings.default_top_k, len(self._labels)))

    async def classify(self, image: bytes, top_k: int = 0) -> Classification:
        """One encoded image. Raises ImageRejected, ModelNotReady or QueueFull."""
        batcher = self._require()
        start = time.perf_counter()
        ok = refused = False
        try:
            probs, timing = await batcher.submit_encoded(image)
            _record_batch_spans(timing)
            latency_ms = (time.perf_counter() - start) * 1000
            result = self._rank(probs, [self.clamp_top_k(top_k)], latency_ms)[0]
            ok = True
            self.statistics.record_success(start, timing, 1)
            return result
        except Refused:
            refused = True
            raise
        finally:
            images = 0 if refused else 1  # a refused image was never processed: not a failed prediction
            self.stats.record(int(ok), images - int(ok), time.perf_counter() - start)
            if not ok:
                self.statistics.record_failure(start)

    async def classify_many(self, images: Sequence[bytes], top_k: int | Sequence[int] = 0,
                            requests: int = 1) -> list[Classification | ImageRejected]:
        """Many images at once; a bad image yields its ImageRejected in its slot.

        `top_k` is one value for all or one per image; `requests` is how many client requests
        the images stand for in the statistics (1 for ClassifyBatch, one per message for streams).
        """
        ks = [top_k] * len(images) if isinstance(top_k, int) else list(top_k)
        batcher = self._require()
        start = time.perf_counter()
        results: list[Classification | ImageRejected] = []
        answered = refused = False
        try:
            outcomes, timing = await batcher.submit_encoded_many(images)
            latency_ms = (time.perf_counter() - start) * 1000
            for outcome in outcomes:
                if isinstance(outcome, Exception) and not isinstance(outcome, ImageRejected):
                    raise outcome
            good = [i for i, o in enumerate(outcomes) if not isinstance(o, Exception)]
            ranked: dict[int, Classification] = {}
            if good:
                probs = np.concatenate([outcomes[i] for i in good])  # type: ignore[misc]
                ranked = dict(zip(good, self._rank(probs, [self.clamp_top_k(ks[i]) for i in good], latency_ms),
                                  strict=True))
                _record_batch_spans(timing)
            results = [ranked.get(i, o) for i, o in enumerate(outcomes)]  # type: ignore[misc]
            answered = True
            self.statistics.record_success(start, timing, len(good), requests)
            return results
        except Refused:
            refused = True
            raise
        finally:
            succeeded = sum(isinstance(r, Classification) for r in results)
            processed = 0 if refused else len(images)  # refused images were never processed: not failures
            self.stats.record(succeeded, processed - succeeded, time.perf_counter() - start, requests)
            if not answered:
                self.statistics.record_failure(start, requests)

    async def infer_tensor(self, x: np.ndarray, received_at: float | None = None) -> np.ndarray:
        """Raw preprocessed tensor (N, *input_shape) -> probabilities (N, classes) (KServe V2).
        `received_at` (time.perf_counter()): when the request arrived, if before this call."""
        batcher = self._require()
        assert self.manifest is not None
        start = time.perf_counter()
        received_at = received_at or start
        ok = refused = False
        try:
            if x.ndim != 4 or tuple(x.shape[1:]) != self.manifest.input_shape or x.shape[0] < 1:
                raise TensorRejected(
                    f"input shape {list(x.shape)} does not match the model input [-1, "
                    f"{', '.join(map(str, self.manifest.input_shape))}]")
            probs, timing = await batcher.submit(x)
            _record_batch_spans(timing)
            ok = True
            self.statistics.record_success(received_at, timing, len(x))
            return probs
        except Refused:
            refused = True
            raise
        finally:
            n = 0 if refused else len(x) if x.ndim else 1  # refused rows were never processed: not failures
            self.stats.record(n if ok else 0, 0 if ok else n, time.perf_counter() - start)
            if not ok:
                self.statistics.record_failure(received_at)

    async def infer_images(self, images: Sequence[bytes], received_at: float | None = None) -> np.ndarray:
        """Encoded images -> probabilities (N, classes), preprocessed as Classify does (KServe V2
        BYTES input). The first unusable image fails the request: ImageRejected naming its
        position ("element 3: ...")."""
        batcher = self._require()
        start = time.perf_counter()
        received_at = received_at or start
        ok = refused = False
        try:
            if not images:
                raise ImageRejected("no images: the tensor has 0 elements")
            if len(images) == 1:  # Classify's per-request path: no chunking, no per-image list
                try:
                    probs, timing = await batcher.submit_encoded(images[0])
                except ImageRejected as exc:
                    raise ImageRejected(f"element 0: {exc}") from None
            else:
                outcomes, timing = await batcher.submit_encoded_many(images)
                for i, outcome in enumerate(outcomes):
                    if isinstance(outcome, ImageRejected):
                        raise ImageRejected(f"element {i}: {outcome}")
                    if isinstance(outcome, Exception):
                        raise outcome
                probs = np.concatenate(outcomes)  # type: ignore[arg-type]
            _record_batch_spans(timing)
            ok = True
            self.statistics.record_success(received_at, timing, len(images))
            return probs
        except Refused:
            refused = True
            raise
        finally:
            n = 0 if refused else len(images)  # refused images were never processed: not failures
            self.stats.record(n if ok else 0, 0 if ok else n, time.perf_counter() - start)
            if not ok:
                self.statistics.record_failure(received_at)

    def _rank(self, probs: np.ndarray, ks: Sequence[int], latency_ms: float) -> list[Classification]:
        order = np.argsort(-probs, axis=1)
        labels = self._labels
        out = []
        for row, idx, k in zip(probs, order, ks, strict=True):
            top = tuple((int(i), labels[i], float(row[i])) for i in idx[:k])
            out.append(Classification(top, top[0][2] < self.min_confidence, latency_ms))
        return out


def _record_batch_spans(timing: BatchTiming) -> None:
    """Queue-wait, decode and inference spans for this request, placed at the times they
    happened (on the engine thread, shared with the rest of its batch)."""
    if not tracing.enabled():
        return
    now_ns, now_pc = time.time_ns(), time.perf_counter()

    def to_ns(pc: float) -> int:
        return now_ns - int((now_pc - pc) * 1e9)

    queue = tracer.start_span("queue_wait", start_time=to_ns(timing.queued_at))
    queue.end(end_time=to_ns(timing.started_at))
    decode = tracer.start_span("decode", start_time=to_ns(timing.started_at))
    decode.end(end_time=to_ns(timing.decoded_at))
    infer = tracer.start_span("inference", start_time=to_ns(timing.decoded_at),
                              attributes={"batch_size": timing.batch_size})
    infer.end(end_time=to_ns(timing.finished_at))
