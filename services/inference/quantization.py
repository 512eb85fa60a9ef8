"""Post-training int8 quantization of a model folder (ONNX Runtime's static QDQ quantization).

The float model is kept as `model.fp32.onnx` (the manifest's `gpu_file`, what CUDA runs) and
`model.onnx` becomes its int8 version, what the CPU runs: convolutions and the linear layer in
int8 (per-channel weights, activations calibrated on training images and their product-photo
renderings), the temperature and softmax left in float so confidences keep their resolution.
Weights use 7 of their 8 bits (ONNX Runtime's reduce_range): on x86 CPUs without VNNI (AVX2 only,
such as many AMD EPYCs) the uint8 x int8 kernels add pairs of products in 16 bits, which saturate
with full-range weights, so the same model answered differently by CPU (top-1 0.6 points lower, 2%
of answers changed against the float model); with 7-bit weights every CPU gives the same answers.
On CPUs with int8 instructions that runs several times faster than the float model for a
negligible loss of top-1 (the model card and docs/performance.md have the figures).

`make train` runs it as its last step; `python -m services.inference.quantization` redoes it on
an existing folder (then `fashion model evaluate` re-measures it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from services.common.config import SHIPPED_MODEL_DIR
from services.inference import evaluation, fashion_mnist
from services.inference.imaging import Preprocessor
from services.inference.model import MANIFEST_NAME, ModelManifest
from services.inference.model_card import write_model_card

FLOAT_FILE = "model.fp32.onnx"
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "MaxPool", "Relu"]
CALIBRATION_IMAGES = 1000
CALIBRATION_SEED = 20261128


def calibration_set(manifest: ModelManifest, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """n preprocessed training inputs: half 28x28 originals, half product-photo renderings, as served."""
    pre = Preprocessor.from_manifest(manifest)
    images, _ = fashion_mnist.load("train")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), n, replace=False)
    originals = [pre.normalize(images[i]) for i in pick[: n // 2]]
    photos = [pre(fashion_mnist.render_product_photo(images[i], rng)) for i in pick[n // 2:]]
    return np.stack(originals + photos).astype(np.float32)


class _Batches(CalibrationDataReader):
    def __init__(self, name: str, data: np.ndarray, batch: int = 50) -> None:
        self._items = iter([{name: data[i: i + batch]} for i in range(0, len(data), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_file(float_path: Path, int8_path: Path, input_name: str, calibration: np.ndarray) -> None:
    """Write the static int8 (QDQ) version of `float_path` to `int8_path`."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))  # shape inference + graph fusions first
        quantize_static(str(prepared), str(int8_path), _Batches(input_name, calibration),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                        op_types_to_quantize=QUANTIZED_OPS)


def quantize_folder(folder: Path, n: int = CALIBRATION_IMAGES) -> dict[str, Any]:
    """Make `model.onnx` of `folder` int8, keeping the float model as model.fp32.onnx (gpu_file).

    Starts from model.fp32.onnx when the folder already has one, so running it twice is harmless.
    Returns the manifest's `quantization` record."""
    raw = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest = ModelManifest.from_dict(folder, raw)  # model.onnx may not exist yet: not load()
    float_path = folder / FLOAT_FILE
    if not float_path.exists():
        manifest.model_path.replace(float_path)
    calibration = calibration_set(manifest, n)
    quantize_file(float_path, folder / manifest.file, manifest.input_name, calibration)
    record = {"method": "onnxruntime static QDQ", "weights": "int8 in a 7-bit range (reduce_range), per channel",
              "activations": "uint8",
              "operators": QUANTIZED_OPS, "calibration_images": n,
              "calibration": "Fashion-MNIST training images, half rendered as product photos",
              "float_file": FLOAT_FILE}
    raw["gpu_file"] = FLOAT_FILE
    raw["quantization"] = record
    (folder / MANIFEST_NAME).write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.inference.quantization", description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=SHIPPED_MODEL_DIR)
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--no-evaluate", action="store_true",
                        help="skip re-measuring the folder (metrics.json, plots, MODEL_CARD.md)")
    parser.add_argument("--eval-photos", type=int, default=10000)
    args = parser.parse_args(argv)
    record = quantize_folder(args.model_dir, args.calibration_images)
    print(json.dumps(record, indent=2))
    if not args.no_evaluate:
        refresh_evaluation(args.model_dir, args.eval_photos)
    return 0


def refresh_evaluation(folder: Path, photos: int) -> None:
    """Re-measure the served (int8) and float models; rewrite metrics.json, plots and the card,
    keeping the training record of the previous metrics.json."""
    metrics_path = folder / evaluation.METRICS_JSON
    previous = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
    metrics = evaluation.evaluate(folder, photos=photos)
    metrics["fp32"] = evaluation.evaluate(folder, photos=0, non_fashion=0, file=FLOAT_FILE)
    if "training" in previous:
        metrics["training"] = previous["training"]
    manifest = ModelManifest.load(folder)
    evaluation.write_artifacts(metrics, manifest.labels, folder)
    if "training" in metrics:
        write_model_card(folder, metrics, manifest)


if __name__ == "__main__":
    raise SystemExit(main())
