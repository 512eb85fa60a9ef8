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

Server processes sharing one port (FASHION_INFERENCE_PROCESSES > 1) publish theirs in their sibling
files in a plain JSON form (to_json, from_json); whichever answers ModelStatistics reports their sum
(summed), as GetStats does with its counters (services.inference.siblings).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.inference.batcher import BatchTiming


@dataclass
class Duration:
    """How many times something happened and how long it took in all, in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(seconds * 1e9)) * count

    def merge(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns

    def to_json(self) -> list[int]:
        return [self.count, self.ns]

    @classmethod
    def from_json(cls, data: Iterable[int]) -> Duration:
        count, ns = data
        return cls(int(count), int(ns))


@dataclass
class BatchSizeStatistics:
    """Model runs of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)

    def merge(self, other: BatchSizeStatistics) -> None:
        self.compute_input.merge(other.compute_input)
        self.compute_infer.merge(other.compute_infer)


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
"""ModelStatistics' per-request durations."""


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

    def merge(self, other: ModelStatistics) -> None:
        """Add `other` (another process's) to these: durations and counts summed, the later last
        inference, runs of the same batch size together."""
        for name in DURATIONS:
            getattr(self, name).merge(getattr(other, name))
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for size, runs in other.batches.items():
            self.batches.setdefault(size, BatchSizeStatistics()).merge(runs)

    def summed(self, others: Iterable[ModelStatistics]) -> ModelStatistics:
        """A new ModelStatistics: these plus `others` (these stay as they are)."""
        total = ModelStatistics.from_json(self.to_json())
        for other in others:
            total.merge(other)
        return total

    def to_json(self) -> dict[str, Any]:
        """Its plain JSON form: {"success": [count, ns], ..., "batches": {"<size>": {...}}}."""
        return {**{name: getattr(self, name).to_json() for name in DURATIONS},
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "last_inference_ms": self.last_inference_ms,
                "batches": {str(size): {"compute_input": runs.compute_input.to_json(),
                                        "compute_infer": runs.compute_infer.to_json()}
                            for size, runs in self.batches.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelStatistics:
        """The ModelStatistics that to_json wrote `data` from."""
        return cls(**{name: Duration.from_json(data[name]) for name in DURATIONS},
                   inference_count=int(data["inference_count"]), execution_count=int(data["execution_count"]),
                   last_inference_ms=int(data["last_inference_ms"]),
                   batches={int(size): BatchSizeStatistics(Duration.from_json(runs["compute_input"]),
                                                           Duration.from_json(runs["compute_infer"]))
                            for size, runs in data["batches"].items()})
