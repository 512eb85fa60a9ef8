"""Settings of every service, read from environment variables (prefix FASHION_) with defaults.

Every field has a docstring; `fashion config` prints them all with their current values, and
README.md documents the same table. Defaults run the whole system on one machine with local
folders, SQLite and no external server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "inference" / "models" / "fashion-mnist"


class CommonSettings(BaseSettings):
    """What every service shares: logs, message limits, where the other services are."""

    model_config = SettingsConfigDict(env_prefix="FASHION_", extra="ignore", use_attribute_docstrings=True)

    log_dir: Path = Path("logs")
    """Folder of the rotating log files (api.log, api_errors.log, batch_*.log, ...)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Lowest level written to the logs and stdout."""
    log_max_bytes: int = 10 * MIB
    """Size at which a log file rotates."""
    log_backup_count: int = 10
    """Rotated log files kept per log."""
    log_stdout: bool = True
    """Also write log lines to stdout."""
    max_message_bytes: int = 16 * MIB
    """Largest gRPC message accepted or sent, on servers and client channels."""
    inference_address: str = "localhost:50051"
    """host:port of the Inference service, for the other services and the CLI."""
    batch_address: str = "localhost:50052"
    """host:port of the Batch service."""
    monitor_address: str = "localhost:50053"
    """host:port of the Monitor service."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long in-flight calls may take to finish before the server exits."""


class InferenceSettings(CommonSettings):
    """The Inference service."""

    inference_host: str = "[::]"
    """Interface the Inference service listens on."""
    inference_port: int = 50051
    """gRPC port of the Inference service (fashion.v1, KServe V2, health, reflection)."""
    inference_metrics_port: int = 9101
    """Prometheus /metrics port of the Inference service; 0 disables it."""
    model_dir: Path = SHIPPED_MODEL_DIR
    """Model folder: model.onnx plus manifest.json. Defaults to the shipped Fashion-MNIST model."""
    max_batch_size: int = 64
    """Most images merged into one ONNX Runtime run by the dynamic batcher."""
    max_delay_ms: float = 0.0
    """How long the oldest queued image may wait for a fuller batch (0: run when the engine is free)."""
    max_queue_size: int = 4096
    """Images waiting for the engine beyond which new calls get RESOURCE_EXHAUSTED."""
    intra_op_threads: int = 0
    """ONNX Runtime intra-op threads (0: one per core)."""
    inter_op_threads: int = 1
    """ONNX Runtime inter-op threads."""
    execution_provider: Literal["auto", "cuda", "cpu"] = "auto"
    """auto prefers CUDAExecutionProvider when onnxruntime-gpu and a GPU are present, else CPU."""
    decode_threads: int = 2
    """Threads that decode and preprocess images, off the event loop."""
    max_image_pixels: int = 40_000_000
    """Images declaring more pixels than this are refused before decoding."""
    default_top_k: int = 3
    """Categories returned when a request does not say how many."""
    min_confidence: float | None = Field(default=None)
    """Confidence below which a result is marked uncertain; unset: the model manifest's value."""
    server_name: str = "fashion-inference"
    """Name reported by KServe ServerMetadata."""
