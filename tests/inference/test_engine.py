"""Execution provider choice and the ONNX session on a real model folder."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from services.common.config import InferenceSettings
from services.inference import cpus, engine
from services.inference.classifier import Classifier
from services.inference.imaging import Preprocessor
from services.inference.model import ModelFolderError, ModelManifest
from tests.images import encode, fashion_images
from tests.support import LABELS, linear_expected


@pytest.mark.parametrize(("available", "preference", "expected"), [
    (["CPUExecutionProvider"], "auto", ["CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_cuda_preferred_when_onnxruntime_offers_it(monkeypatch, available, preference, expected) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert engine.choose_providers(preference) == expected


def test_cuda_demanded_but_absent_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match="execution_provider=cuda"):
        engine.choose_providers("cuda")


def test_session_runs_the_model_and_reports_its_provider(linear_model) -> None:
    folder, wb = linear_model
    model = engine.OnnxModel(ModelManifest.load(folder), "auto", intra_op_threads=1)
    assert model.provider == engine.choose_providers("auto")[0]
    x = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(model.run(x), linear_expected(wb, x), rtol=1e-4, atol=1e-6)
    model.warm_up()


def test_padded_batches_give_each_row_its_own_answer(linear_model) -> None:
    """On CUDA, batches are padded to a fixed size (cuda_batch); the padding must never reach the
    caller. The padding itself does not depend on the provider, so it is checked here on the CPU."""
    folder, wb = linear_model
    model = engine.OnnxModel(ModelManifest.load(folder), "cpu", intra_op_threads=1, cuda_batch=16)
    assert model.pad_to == 0  # only CUDA pads
    model.pad_to = 16
    rng = np.random.default_rng(1)
    for n in (1, 7, 16, 20):  # under, at and over the padded size
        x = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
        out = model.run(x)
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, linear_expected(wb, x), rtol=1e-4, atol=1e-6)


def test_threads_default_to_the_cpus_the_container_may_use(monkeypatch, linear_model) -> None:
    """intra_op_threads 0: the Inference service's cores (services.inference.cpus.machine_cpus, which reads
    the CPU limit through services.common.cpus.available_cpus, not the node's cores)."""
    monkeypatch.setattr(cpus, "available_cpus", lambda: 3)
    folder, _ = linear_model
    assert engine.OnnxModel(ModelManifest.load(folder), "cpu").intra_op_threads == 3
    assert engine.OnnxModel(ModelManifest.load(folder), "cpu", intra_op_threads=1).intra_op_threads == 1


def test_manifest_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(ModelFolderError, match=r"no manifest\.json"):
        ModelManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"labels": ["a", "b"], "color_mode": "CMYK"}')
    with pytest.raises(ModelFolderError, match="color_mode"):
        ModelManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text('{"labels": ["a", "b"]}')
    with pytest.raises(ModelFolderError, match=r"no model\.onnx"):
        ModelManifest.load(tmp_path)


def test_cuda_runs_the_folders_gpu_file(tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"int8")
    (tmp_path / "model.fp32.onnx").write_bytes(b"float")
    (tmp_path / "manifest.json").write_text('{"labels": ["a", "b"], "gpu_file": "model.fp32.onnx"}')
    m = ModelManifest.load(tmp_path)
    assert m.model_path_for("CUDAExecutionProvider") == tmp_path / "model.fp32.onnx"
    assert m.model_path_for("CPUExecutionProvider") == tmp_path / "model.onnx"
    (tmp_path / "model.fp32.onnx").unlink()
    with pytest.raises(ModelFolderError, match=r"no model\.fp32\.onnx"):
        ModelManifest.load(tmp_path)


@pytest.mark.parametrize("workers_run_model", [True, False])
async def test_the_service_session_is_single_threaded_when_the_workers_run_the_model(
        monkeypatch, linear_model, workers_run_model: bool) -> None:
    """With 4 cores and 2 worker processes running the model, each worker gets 2 threads and the service
    process's own session, which then only runs lone one-row requests, gets 1; when the workers only
    decode, the service's session runs every batch on all 4."""
    monkeypatch.setattr(cpus, "available_cpus", lambda: 4)
    folder, wb = linear_model
    classifier = Classifier(InferenceSettings(model_dir=folder, execution_provider="cpu", inference_processes=1,
                                              worker_processes=2,
                                              workers_run_model=workers_run_model))
    await classifier.load()
    try:
        assert classifier.model is not None
        assert classifier.model.intra_op_threads == (1 if workers_run_model else 4)
        workers = classifier._workers
        assert workers is not None
        assert (workers.model.threads if workers.model else 0) == (2 if workers_run_model else 0)
        x, _ = fashion_images(1)
        image = encode(x[0])
        want = linear_expected(wb, Preprocessor.from_manifest(ModelManifest.load(folder))(image)[None])[0]
        result = await classifier.classify(image)  # a lone request: run by the service's session
        assert result.category == LABELS[int(np.argmax(want))]
        assert result.confidence == pytest.approx(float(want.max()), rel=1e-4)
    finally:
        await classifier.close()
