"""The model's inference statistics, as Triton's statistics extension reports them (KServe V2
ModelStatistics, REST GET /v2/models/{name}/stats), from the timings the batcher already takes.

Per request (every protocol: fashion.v1 Classify, ClassifyBatch and ClassifyStream, KServe
ModelInfer and ModelStreamInfer): `success` or `fail` (count and total time from arrival to
answer), and for successes `queue` (waiting for a batch), `compute_input` (turning the request
into model input: tensor conversion, image decoding), `compute_infer` (the model run of its
batch) and `compute_output` (from the batch's end to the answer). `inference_count` counts images,
`execution_count` model runs; `batches` has, per batch size, how many runs and their input and
model time (their output time is per request only: a batch's rows are answered by each request on
its own). A request whose images ran in several batches counts its first start to last end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.inference.batcher import BatchTiming


@dataclass
class Duration:
    """How many times something happened and how long it took in all, in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(seconds * 1e9)) * count


@dataclass
class BatchSizeStatistics:
    """Model runs of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    """When the last request finished, milliseconds since the epoch (0: none yet)."""
    batches: dict[int, BatchSizeStatistics] = field(default_factory=dict)

    def record_success(self, received_at: float, timing: BatchTiming, images: int, requests: int = 1) -> None:
        """Requests (`requests` of them, sharing `timing`, `images` images in all) answered now;
        times are time.perf_counter() values."""
        now = time.perf_counter()
        self.success.add(now - received_at, requests)
        self.queue.add(timing.started_at - timing.queued_at, requests)
        self.compute_input.add((timing.queued_at - received_at) + (timing.decoded_at - timing.started_at), requests)
        self.compute_infer.add(timing.finished_at - timing.decoded_at, requests)
        self.compute_output.add(now - timing.finished_at, requests)
        self.inference_count += images
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, received_at: float, requests: int = 1) -> None:
        self.fail.add(time.perf_counter() - received_at, requests)
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_execution(self, batch_size: int, input_s: float, infer_s: float) -> None:
        """One model run of `batch_size` rows: `input_s` decoding its images, `infer_s` in the model."""
        self.execution_count += 1
        per_size = self.batches.get(batch_size)
        if per_size is None:
            per_size = self.batches[batch_size] = BatchSizeStatistics()
        per_size.compute_input.add(input_s)
        per_size.compute_infer.add(infer_s)
