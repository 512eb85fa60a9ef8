"""`fashion model evaluate`: the model folder measured through the service's own preprocessing.

Every image is encoded first (PNG for the 28x28 test set, JPEG product photos, blank pages, noise
and text) and turned into the model's input by `imaging.Preprocessor`, exactly as a request would
be, then run with ONNX Runtime. Reports top-1 and per-class accuracy, the confusion matrix,
expected calibration error (ECE, 15 bins) with and without the temperature folded into the graph,
the photo-style accuracy gap, the confidence on non-fashion inputs, and throughput.

No torch here: this runs with the services' runtime dependencies only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from services.inference import fashion_mnist
from services.inference.imaging import Preprocessor
from services.inference.model import ModelManifest

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "fashion-mnist"
ECE_BINS = 15
EVAL_SEED = 20240  # photo and non-fashion renderings; training draws from other streams
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
METRICS_JSON = "metrics.json"


def open_session(manifest: ModelManifest, threads: int = 2, path: Path | None = None) -> ort.InferenceSession:
    """A CPU session on the folder's model.onnx, or on `path` (another file of the folder)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path or manifest.model_path), options, providers=["CPUExecutionProvider"])


def predict(session: ort.InferenceSession, manifest: ModelManifest, inputs: np.ndarray,
            batch_size: int = 64) -> np.ndarray:
    """Probabilities (N, classes) for preprocessed inputs (N, C, H, W), softmax applied if needed."""
    outputs = [
        session.run([manifest.output_name], {manifest.input_name: inputs[i: i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    scores = np.concatenate(outputs).astype(np.float64)
    if manifest.output_kind == "logits":
        return softmax(scores / manifest.temperature)
    return scores


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Undo a temperature folded into the graph: softmax(z/T) gives back softmax(z) via T*log(p)."""
    return softmax(temperature * np.log(np.maximum(probs, 1e-38)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the count-weighted gap between confidence and accuracy over equal-width bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bin i holds confidences in (i/bins, (i+1)/bins]; confidence is always > 1/classes > 0.
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(ece)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    return [
        {"lo": b / bins, "hi": (b + 1) / bins, "count": int((which == b).sum()),
         "confidence": float(conf[which == b].mean()), "accuracy": float(correct[which == b].mean())}
        for b in range(bins) if (which == b).any()
    ]


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, names: Sequence[str],
                           temperature: float, min_confidence: float) -> dict[str, Any]:
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    confident = probs.max(axis=1) >= min_confidence
    raw = uncalibrated(probs, temperature)
    return {
        "n": len(labels),
        "top1": float(correct.mean()),
        "per_class": {name: float(correct[labels == k].mean()) for k, name in enumerate(names)},
        "ece": expected_calibration_error(probs, labels),
        "ece_uncalibrated": expected_calibration_error(raw, labels),
        "nll": float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean()),
        "nll_uncalibrated": float(-np.log(np.maximum(raw[np.arange(len(labels)), labels], 1e-12)).mean()),
        "uncertain_rate": float(1 - confident.mean()),
        "top1_when_confident": float(correct[confident].mean()) if confident.any() else math.nan,
        "confusion": confusion_matrix(labels, predicted, len(names)).tolist(),
        "reliability": reliability(probs, labels),
        "reliability_uncalibrated": reliability(raw, labels),
    }


def preprocess_all(pre: Preprocessor, blobs: Sequence[bytes]) -> tuple[np.ndarray, float]:
    """Stacked model inputs and the seconds spent decoding and preprocessing them."""
    start = time.perf_counter()
    inputs = np.stack([pre(b) for b in blobs])
    return inputs, time.perf_counter() - start


def model_throughput(session: ort.InferenceSession, manifest: ModelManifest, inputs: np.ndarray,
                     batch_size: int = 64, seconds: float = 3.0) -> float:
    """Images/s of the ONNX session alone at a fixed batch size: best of three timed windows, since
    the machine may be shared."""
    batch = np.ascontiguousarray(inputs[:batch_size])
    feed = {manifest.input_name: batch}
    for _ in range(5):
        session.run(None, feed)
    best = 0.0
    for _ in range(3):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            session.run(None, feed)
            runs += 1
        best = max(best, runs * len(batch) / elapsed)
    return best


def confidence_summary(probs: np.ndarray, min_confidence: float) -> dict[str, Any]:
    conf = probs.max(axis=1)
    top = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
    return {
        "n": len(conf),
        "quantiles": {f"p{q}": float(np.percentile(conf, q)) for q in (50, 90, 95, 99)},
        "max": float(conf.max()),
        "mean": float(conf.mean()),
        "above_min_confidence": float((conf >= min_confidence).mean()),
        "top_class_counts": top.tolist(),
    }


def non_fashion_inputs(pre: Preprocessor, per_kind: int, seed: int) -> dict[str, np.ndarray]:
    out = {}
    for k, kind in enumerate(fashion_mnist.NON_FASHION_KINDS):
        rng = np.random.default_rng([seed, 7, k])
        out[kind] = np.stack([pre(fashion_mnist.render_non_fashion(kind, rng)) for _ in range(per_kind)])
    return out


def evaluate(model_dir: Path | str = DEFAULT_MODEL_DIR, photos: int = 2000, non_fashion: int = 300,
             threads: int = 2, batch_size: int = 64, benchmark: bool = True, seed: int = EVAL_SEED,
             log: Callable[[str], None] | None = None, file: str | None = None) -> dict[str, Any]:
    """All metrics as one JSON-ready dict. `photos` test images (a seeded sample, all 10,000 at most)
    are also rendered as product photos; `non_fashion` inputs of each kind are scored. `file` evaluates
    another ONNX file of the folder (e.g. the float original of a quantized model.onnx)."""
    log = log or (lambda _msg: None)
    manifest = ModelManifest.load(model_dir)
    pre = Preprocessor.from_manifest(manifest)
    model_path = manifest.folder / file if file else manifest.model_path
    session = open_session(manifest, threads, model_path)
    names = list(manifest.labels)
    images, labels = fashion_mnist.load("test")
    labels = labels.astype(np.int64)

    log(f"28x28 test set: {len(images)} PNGs through the service preprocessing")
    pngs = [fashion_mnist.encode_png(img) for img in images]
    inputs, png_pre_s = preprocess_all(pre, pngs)
    start = time.perf_counter()
    probs = predict(session, manifest, inputs, batch_size)
    infer_s = time.perf_counter() - start
    test = classification_metrics(probs, labels, names, manifest.temperature, manifest.min_confidence)

    photo_metrics: dict[str, Any] | None = None
    photo_pre_s = photo_infer_s = 0.0
    if photos > 0:
        log(f"photo-style set: rendering {min(photos, len(images))} product photos")
        rng = np.random.default_rng([seed, 1])
        pick = np.sort(rng.permutation(len(images))[:photos])
        jpegs = [fashion_mnist.render_product_photo(images[i], rng) for i in pick]
        photo_inputs, photo_pre_s = preprocess_all(pre, jpegs)
        start = time.perf_counter()
        photo_probs = predict(session, manifest, photo_inputs, batch_size)
        photo_infer_s = time.perf_counter() - start
        photo_metrics = classification_metrics(photo_probs, labels[pick], names, manifest.temperature,
                                               manifest.min_confidence)
        same = float((probs[pick].argmax(axis=1) == labels[pick]).mean())
        photo_metrics.update(top1_28x28_same_images=same, gap=same - photo_metrics["top1"],
                             preprocess_ms=1e3 * photo_pre_s / len(pick),
                             mean_jpeg_bytes=float(np.mean([len(j) for j in jpegs])))

    ood: dict[str, Any] = {}
    if non_fashion > 0:
        log(f"non-fashion inputs: {non_fashion} each of {', '.join(fashion_mnist.NON_FASHION_KINDS)}")
        for kind, x in non_fashion_inputs(pre, non_fashion, seed).items():
            ood[kind] = confidence_summary(predict(session, manifest, x, batch_size), manifest.min_confidence)

    throughput: dict[str, Any] = {"threads": threads, "batch_size": batch_size}
    n = len(images)
    throughput["png_end_to_end_images_per_s"] = n / (png_pre_s + infer_s)
    throughput["png_preprocess_ms"] = 1e3 * png_pre_s / n
    if photo_metrics is not None:
        throughput["photo_end_to_end_images_per_s"] = photo_metrics["n"] / (photo_pre_s + photo_infer_s)
        throughput["photo_preprocess_ms"] = photo_metrics["preprocess_ms"]
    if benchmark:
        log("throughput: ONNX session alone on preprocessed tensors")
        throughput["model_only_images_per_s"] = model_throughput(session, manifest, inputs, batch_size)

    return {
        "model": {"name": manifest.name, "version": manifest.version, "temperature": manifest.temperature,
                  "min_confidence": manifest.min_confidence, "file": model_path.name,
                  "file_bytes": model_path.stat().st_size},
        "test_28x28": test,
        "photos": photo_metrics,
        "non_fashion": ood,
        "throughput": throughput,
        "machine": {"cpu_count": os.cpu_count(), "onnxruntime": ort.__version__},
    }


def write_artifacts(metrics: dict[str, Any], labels: Sequence[str], out: Path) -> list[Path]:
    """metrics.json, the confusion-matrix PNG and the reliability diagram, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_JSON).write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    plot_confusion(np.asarray(metrics["test_28x28"]["confusion"]), labels, out / CONFUSION_PNG,
                   title=f"Fashion-MNIST test set, top-1 {100 * metrics['test_28x28']['top1']:.2f}%")
    plot_reliability(metrics, out / RELIABILITY_PNG)
    return [out / METRICS_JSON, out / CONFUSION_PNG, out / RELIABILITY_PNG]


def plot_confusion(cm: np.ndarray, labels: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe inside services
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=90)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = metrics["test_28x28"]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=90)
    ax.plot([0, 1], [0, 1], color="gray", linewidth=1, linestyle="--")
    for key, name, ece in (("reliability_uncalibrated", "before (T=1)", test["ece_uncalibrated"]),
                           ("reliability", f"after (T={metrics['model']['temperature']:.3f})", test["ece"])):
        bins = test[key]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                label=f"{name}: ECE {100 * ece:.2f}%")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability, 28x28 test set (15 bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_report(metrics: dict[str, Any]) -> str:
    test, photos, tp = metrics["test_28x28"], metrics["photos"], metrics["throughput"]
    m = metrics["model"]
    lines = [
        f"model {m['name']} v{m['version']}  (temperature {m['temperature']:.3f}, "
        f"min_confidence {m['min_confidence']:.2f})",
        "",
        f"28x28 test set ({test['n']} PNGs): top-1 {100 * test['top1']:.2f}%   "
        f"ECE {100 * test['ece']:.2f}% (uncalibrated {100 * test['ece_uncalibrated']:.2f}%)   "
        f"NLL {test['nll']:.4f}",
        f"  below min_confidence: {100 * test['uncertain_rate']:.1f}%, "
        f"top-1 of the rest {100 * test['top1_when_confident']:.2f}%",
    ]
    width = max(len(label) for label in test["per_class"])
    header = "  per class" + " " * (width - 7) + "28x28" + ("   photos" if photos else "")
    lines.append(header)
    for label, acc in test["per_class"].items():
        row = f"    {label:<{width}}  {100 * acc:6.2f}%"
        if photos:
            row += f"  {100 * photos['per_class'][label]:6.2f}%"
        lines.append(row)
    if photos:
        lines.append(
            f"photo-style set ({photos['n']} JPEGs): top-1 {100 * photos['top1']:.2f}% vs "
            f"{100 * photos['top1_28x28_same_images']:.2f}% on the same images at 28x28 "
            f"(gap {100 * photos['gap']:+.2f} points)   ECE {100 * photos['ece']:.2f}%"
        )
    if metrics["non_fashion"]:
        lines.append(f"non-fashion inputs: top confidence (min_confidence {m['min_confidence']:.2f})")
        for kind, s in metrics["non_fashion"].items():
            q = s["quantiles"]
            lines.append(
                f"    {kind:<6} n={s['n']:<5} median {q['p50']:.3f}  p90 {q['p90']:.3f}  p99 {q['p99']:.3f}"
                f"  max {s['max']:.3f}   at or above min_confidence: {100 * s['above_min_confidence']:.1f}%"
            )
    lines.append(f"throughput ({tp['threads']} threads, batch {tp['batch_size']}):")
    if "model_only_images_per_s" in tp:
        lines.append(f"    model only (ONNX Runtime): {tp['model_only_images_per_s']:,.0f} images/s")
    lines.append(f"    28x28 PNG decode+preprocess+infer: {tp['png_end_to_end_images_per_s']:,.0f} images/s "
                 f"({tp['png_preprocess_ms']:.3f} ms/image preprocessing)")
    if "photo_end_to_end_images_per_s" in tp:
        lines.append(f"    JPEG photo decode+preprocess+infer: {tp['photo_end_to_end_images_per_s']:,.0f} "
                     f"images/s ({tp['photo_preprocess_ms']:.3f} ms/image preprocessing)")
    return "\n".join(lines)


def evaluate_and_write(model_dir: Path | None = None, photos: int = 2000, non_fashion: int = 300, threads: int = 2,
                       batch_size: int = 64, benchmark: bool = True, out: Path = Path("results/evaluation"),
                       ) -> tuple[dict[str, Any], str, list[Path]]:
    """`fashion model evaluate`: evaluate the model folder (default: the shipped model), write metrics.json
    and the plots into `out`; returns the metrics, the text report and the files written. Progress goes to
    stderr. Raises ValueError when Fashion-MNIST is not installed."""
    if not fashion_mnist.available():
        raise ValueError("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    model_dir = model_dir or DEFAULT_MODEL_DIR
    metrics = evaluate(model_dir, photos=photos, non_fashion=non_fashion, threads=threads, batch_size=batch_size,
                       benchmark=benchmark, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    paths = write_artifacts(metrics, ModelManifest.load(model_dir).labels, out)
    return metrics, format_report(metrics), paths
