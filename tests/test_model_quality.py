"""The shipped default model, measured through the service's own preprocessing on the full test set.

Fails below 93% top-1 or above 3% ECE on the 10,000 28x28 test images, when product photos lose more
than 3 points against the same images at 28x28, or when blank pages, noise or text photos mostly reach
`min_confidence`. Needs Fashion-MNIST (Debian package dataset-fashion-mnist); skipped without it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from services.inference import evaluation, fashion_mnist
from services.inference.imaging import Preprocessor
from services.inference.model import ModelManifest

MODEL_DIR = evaluation.DEFAULT_MODEL_DIR

needs_dataset = pytest.mark.skipif(
    not fashion_mnist.available(),
    reason=f"Fashion-MNIST not found in {fashion_mnist.DATASET_DIR} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def manifest() -> ModelManifest:
    return ModelManifest.load(MODEL_DIR)


@pytest.fixture(scope="module")
def metrics() -> dict:
    # 1,500 photos keep the run near 20 s on two cores; the gap is paired on the same images.
    return evaluation.evaluate(MODEL_DIR, photos=1500, non_fashion=150, benchmark=False)


def test_model_folder_follows_the_contract(manifest: ModelManifest) -> None:
    assert manifest.labels == fashion_mnist.LABELS
    assert manifest.name == "fashion-mnist-cnn"
    assert (manifest.input_name, manifest.input_shape, manifest.layout) == ("image", (1, 28, 28), "NCHW")
    assert (manifest.output_name, manifest.output_kind) == ("probabilities", "probabilities")
    assert (manifest.color_mode, manifest.background) == ("L", "dark")
    assert 0 < manifest.min_confidence < 1 and manifest.temperature > 0
    for name in ("MODEL_CARD.md", evaluation.METRICS_JSON, evaluation.CONFUSION_PNG):
        assert (MODEL_DIR / name).is_file(), name
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 5_000_000


def test_graph_has_a_dynamic_batch_and_outputs_probabilities(manifest: ModelManifest) -> None:
    session = evaluation.open_session(manifest, threads=1)
    for batch in (1, 7):
        x = np.random.default_rng(batch).normal(size=(batch, 1, 28, 28)).astype(np.float32)
        (probs,) = session.run(None, {"image": x})
        assert probs.shape == (batch, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert (probs >= 0).all()


@needs_dataset
def test_top1_on_the_full_test_set(metrics: dict) -> None:
    assert metrics["test_28x28"]["n"] == 10_000
    assert metrics["test_28x28"]["top1"] >= 0.93


@needs_dataset
def test_calibrated_ece(metrics: dict) -> None:
    assert metrics["test_28x28"]["ece"] <= 0.03


@needs_dataset
def test_product_photos_within_three_points(metrics: dict) -> None:
    photos = metrics["photos"]
    assert photos["n"] == 1500
    same = photos["top1_28x28_same_images"]
    assert photos["gap"] <= 0.03, f"photos {photos['top1']:.4f} vs the same images at 28x28 {same:.4f}"


@needs_dataset
def test_non_fashion_inputs_are_mostly_uncertain(metrics: dict) -> None:
    for kind in fashion_mnist.NON_FASHION_KINDS:
        summary = metrics["non_fashion"][kind]
        assert summary["above_min_confidence"] <= 0.1, (kind, summary)


def test_shipped_metrics_match_the_manifest(manifest: ModelManifest) -> None:
    shipped = json.loads((MODEL_DIR / evaluation.METRICS_JSON).read_text())
    assert shipped["model"]["temperature"] == manifest.temperature
    assert shipped["model"]["min_confidence"] == manifest.min_confidence


def test_ece_is_zero_when_confidence_matches_accuracy() -> None:
    # Two bins: confidence 0.6 with 60% right, confidence 0.9 with 90% right.
    probs = np.array([[0.6, 0.4]] * 10 + [[0.9, 0.1]] * 10)
    labels = np.array([0] * 6 + [1] * 4 + [0] * 9 + [1])
    assert evaluation.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_measures_overconfidence() -> None:
    probs = np.array([[0.95, 0.05]] * 10)
    labels = np.array([0] * 7 + [1] * 3)  # 70% right at 95% confidence
    assert evaluation.expected_calibration_error(probs, labels) == pytest.approx(0.25)


def test_folded_temperature_can_be_undone() -> None:
    logits = np.random.default_rng(0).normal(size=(5, 10)) * 4
    t = 1.7
    np.testing.assert_allclose(evaluation.uncalibrated(evaluation.softmax(logits / t), t),
                               evaluation.softmax(logits), atol=1e-9)


@needs_dataset
def test_evaluate_command_writes_report_and_artifacts(tmp_path) -> None:
    fashion = Path(sys.executable).parent / "fashion"
    out = subprocess.run([str(fashion), "model", "evaluate", "--photos", "0", "--non-fashion", "0",
                          "--no-benchmark", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "28x28 test set (10000 PNGs): top-1" in out.stdout
    written = json.loads((tmp_path / evaluation.METRICS_JSON).read_text())
    assert written["photos"] is None and written["test_28x28"]["n"] == 10_000
    assert (tmp_path / evaluation.CONFUSION_PNG).stat().st_size > 10_000


def test_int8_weights_use_a_7_bit_range_so_every_cpu_answers_alike(manifest: ModelManifest) -> None:
    """Full-range int8 weights saturate ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX2
    only): the shipped model answered 2% of the test set differently from its float original there, and lost
    0.6 points of top-1, while a VNNI CPU did not. Weights quantized to 7 bits (reduce_range: within ±64)
    cannot saturate: 255 x 64 x 2 < 32,767."""
    graph = onnx.load(manifest.folder / manifest.file).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = [initializers[node.input[0]] for node in graph.node
               if node.op_type == "DequantizeLinear" and node.input[0] in initializers
               and initializers[node.input[0]].dtype == np.int8]
    assert len(weights) >= 3  # the convolutions and the linear layer
    assert all(np.abs(w.astype(np.int16)).max() <= 64 for w in weights), [(w.min(), w.max()) for w in weights]


def test_int8_model_agrees_with_its_float_original(manifest: ModelManifest) -> None:
    assert manifest.gpu_file and (manifest.folder / manifest.gpu_file).is_file()
    images, _ = fashion_mnist.load("test")
    pre = Preprocessor.from_manifest(manifest)
    x = np.stack([pre.normalize(img) for img in images[:2000]])
    int8 = evaluation.predict(evaluation.open_session(manifest, 1), manifest, x)
    fp32 = evaluation.predict(evaluation.open_session(manifest, 1, manifest.folder / manifest.gpu_file), manifest, x)
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.99
    assert np.abs(int8 - fp32).max(axis=1).mean() < 0.02, "confidences keep their resolution"
    assert (manifest.folder / manifest.file).stat().st_size < 0.5 * (manifest.folder / manifest.gpu_file).stat().st_size
