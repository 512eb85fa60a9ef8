"""Fixtures shared by all tests: fixture model, and an Inference service on real ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import ServiceProcess, build_linear_model, free_port, start_service


@pytest.fixture(scope="session")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A small real ONNX model folder and its weights (for exact expected outputs)."""
    folder = tmp_path_factory.mktemp("models") / "linear"
    wb = build_linear_model(folder)
    return folder, wb


def inference_env(model_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "FASHION_MODEL_DIR": str(model_dir),
        "FASHION_INFERENCE_PORT": str(free_port()),
        "FASHION_INFERENCE_HOST": "127.0.0.1",
        "FASHION_INFERENCE_METRICS_PORT": str(free_port()),
        "FASHION_INTRA_OP_THREADS": "1",
        "FASHION_SHUTDOWN_GRACE_S": "5",
        **extra,
    }


def start_inference(workdir: Path, model_dir: Path, **extra: str) -> ServiceProcess:
    env = inference_env(model_dir, **extra)
    return start_service("services.inference", workdir, env, f"127.0.0.1:{env['FASHION_INFERENCE_PORT']}")


@pytest.fixture(scope="session")
def inference_server(tmp_path_factory: pytest.TempPathFactory, linear_model: tuple[Path, np.ndarray]
                     ) -> Iterator[ServiceProcess]:
    """One Inference service (fixture model) shared by the tests that don't stop it."""
    svc = start_inference(tmp_path_factory.mktemp("inference"), linear_model[0])
    try:
        svc.wait_serving()
        yield svc
    finally:
        svc.terminate()


SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "services" / "inference" / "models" / "fashion-mnist"


@pytest.fixture(scope="session")
def fashion_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """An Inference service running the shipped model (services/inference/models/fashion-mnist),
    for tests of accuracy through the service."""
    svc = start_inference(tmp_path_factory.mktemp("inference-shipped"), SHIPPED_MODEL, FASHION_INTRA_OP_THREADS="2")
    try:
        svc.wait_serving()
        yield svc
    finally:
        svc.terminate()
