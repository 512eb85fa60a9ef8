"""Train the default model (`make train`): a compact CNN on Fashion-MNIST, exported to ONNX.

    python -m services.inference.training [--epochs 24] [--out services/inference/models/fashion-mnist]

Needs the `train` extra (PyTorch CPU); the only module that imports torch. Reproducible: seeds are
fixed and the data order, augmentation and renderings all derive from `--seed`.

Data: 55,000 training images, each also rendered once as a product photo (fashion_mnist.
render_product_photo) and mapped back through the service's own Preprocessor, so the model learns
what the service will feed it; each sample is drawn from either version. Blank pages, noise and
text photos (also through the Preprocessor) are trained toward the uniform distribution (outlier
exposure) so that they get low confidence. 5,000 held-out training images fit the temperature.
The renderings are cached as .npy under --cache (about 50 MB, never committed).

Output: a model folder with model.onnx (BatchNorm folded, calibrated softmax inside, dynamic
batch), manifest.json, metrics.json, plots and MODEL_CARD.md from a full evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.inference import evaluation, fashion_mnist, imaging, quantization
from services.inference.imaging import Preprocessor
from services.inference.model import ModelManifest
from services.inference.model_card import write_model_card

MODEL_NAME = "fashion-mnist-cnn"
MODEL_VERSION = "1"
# Pixel statistics of the Fashion-MNIST training set (pixels / 255).
MEAN, STD = 0.2860, 0.3530
OPSET = 17


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 30
    batch_size: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    holdout: int = 5000
    photo_fraction: float = 0.5
    """Chance that a training sample is drawn from its product-photo rendering."""
    outliers_per_batch: int = 16
    outlier_weight: float = 0.5
    outliers_per_kind: int = 2000
    flip: float = 0.5
    max_shift: int = 1
    erase: float = 0.1
    widths: tuple[int, int, int] = (32, 64, 128)
    threads: int = 2


class FashionCNN(nn.Sequential):
    """conv32 @28 -> pool -> conv64 @14 -> pool -> conv128, conv128 @7 -> linear over the 7x7 map.

    About 14.7 M multiply-adds per image: sized for >= 4,000 images/s on two CPU threads in
    ONNX Runtime. Pooling early keeps the expensive wide layers on 7x7 maps. The classifier reads
    the whole 7x7 map rather than its global average: where a feature is (sleeve length, collar,
    heel) separates the classes, and it scored higher on the held-out set at equal cost.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), classes: int = 10) -> None:
        a, b, c = widths
        super().__init__(
            *_conv(1, a), nn.MaxPool2d(2),
            *_conv(a, b), nn.MaxPool2d(2),
            *_conv(b, c), *_conv(c, c),
            nn.Flatten(), nn.Linear(c * 7 * 7, classes),
        )


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def multiply_adds(model: nn.Module, shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    total = 0

    def count(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Data:
    images: np.ndarray  # (60000, 28, 28) uint8, original
    photos: np.ndarray  # same images as product photos, through the Preprocessor
    labels: np.ndarray
    train_idx: np.ndarray
    holdout_idx: np.ndarray
    outliers: np.ndarray  # non-fashion inputs for training, through the Preprocessor
    outliers_holdout: dict[str, np.ndarray]  # per kind, for choosing min_confidence


def _preprocessor() -> Preprocessor:
    # The manifest's own preprocessing; only the normalization differs, applied later in torch.
    return Preprocessor(width=28, height=28, color_mode="L", layout="NCHW", background="dark")


def _cache_key(*parts: object) -> str:
    """Renderings depend on the renderers and the preprocessing code: a change re-renders."""
    h = hashlib.sha256()
    h.update(Path(imaging.__file__).read_bytes())
    for fn in (fashion_mnist.render_product_photo, fashion_mnist._dark_enough_color,
               fashion_mnist.render_non_fashion, fashion_mnist.render_blank_page,
               fashion_mnist.render_noise, fashion_mnist.render_text_photo, fashion_mnist._encode):
        h.update(inspect.getsource(fn).encode())
    h.update(repr(parts).encode())
    return h.hexdigest()[:12]


def _cached(path: Path, make: Any, log: Any) -> np.ndarray:
    if path.exists():
        return np.load(path)
    start = time.perf_counter()
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    log(f"  rendered {path.name} in {time.perf_counter() - start:.0f} s")
    return arr


def render_photos(images: np.ndarray, seed: int) -> np.ndarray:
    pre = _preprocessor()
    rng = np.random.default_rng([seed, 1])
    return np.stack([pre.to_model_pixels(fashion_mnist.render_product_photo(img, rng)) for img in images])


def render_outliers(kind: str, count: int, seed: int, stream: int) -> np.ndarray:
    pre = _preprocessor()
    rng = np.random.default_rng([seed, stream, fashion_mnist.NON_FASHION_KINDS.index(kind)])
    return np.stack([pre.to_model_pixels(fashion_mnist.render_non_fashion(kind, rng)) for _ in range(count)])


def load_data(cfg: TrainConfig, cache: Path, log: Any) -> Data:
    images, labels = fashion_mnist.load("train")
    images = images.copy()  # writable, for torch.from_numpy
    key = _cache_key(cfg.seed, len(images))
    photos = _cached(cache / f"photos-train-{key}.npy", lambda: render_photos(images, cfg.seed), log)
    outliers = np.concatenate([
        _cached(cache / f"outliers-{kind}-{cfg.outliers_per_kind}-{key}.npy",
                lambda kind=kind: render_outliers(kind, cfg.outliers_per_kind, cfg.seed, 2), log)
        for kind in fashion_mnist.NON_FASHION_KINDS
    ])
    held = {kind: _cached(cache / f"outliers-holdout-{kind}-{key}.npy",
                          lambda kind=kind: render_outliers(kind, 300, cfg.seed, 3), log)
            for kind in fashion_mnist.NON_FASHION_KINDS}
    order = np.random.default_rng([cfg.seed, 0]).permutation(len(images))
    return Data(images, photos, labels.astype(np.int64), np.sort(order[cfg.holdout:]),
                np.sort(order[: cfg.holdout]), outliers, held)


def augment(x: torch.Tensor, cfg: TrainConfig, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips, shifts of up to `max_shift` pixels and erased rectangles (cutout),
    batched. x: (B, 1, 28, 28) in [0, 1]."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < cfg.flip
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    s = cfg.max_shift
    if s:
        padded = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n, 1, 1), generator=g)
        dx = torch.randint(0, 2 * s + 1, (n, 1, 1), generator=g)
        rows = dy + torch.arange(h).view(1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, w)
        x = padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)
    if cfg.erase:
        area = torch.empty(n).uniform_(0.02, 0.2, generator=g) * h * w
        aspect = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=g))
        eh = (area * aspect).sqrt().clamp(1, h).long()
        ew = (area / aspect).sqrt().clamp(1, w).long()
        top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
        left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
        yy = torch.arange(h).view(1, h, 1)
        xx = torch.arange(w).view(1, 1, w)
        box = ((yy >= top.view(n, 1, 1)) & (yy < (top + eh).view(n, 1, 1))
               & (xx >= left.view(n, 1, 1)) & (xx < (left + ew).view(n, 1, 1)))
        erase = (torch.rand(n, generator=g) < cfg.erase).view(n, 1, 1)
        x = x.masked_fill((box & erase).unsqueeze(1), 0.0)
    return x


def _to_input(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(pixels).float().div_(255.0)
    return t.unsqueeze(1) if t.dim() == 3 else t


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


# ------------------------------------------------------------------------------------------ training

def train(cfg: TrainConfig, data: Data, log: Any) -> nn.Module:
    g = torch.Generator().manual_seed(cfg.seed)
    model = FashionCNN(cfg.widths).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.max_lr, momentum=0.9, nesterov=True)
    steps = len(data.train_idx) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, epochs=cfg.epochs,
                                                steps_per_epoch=steps, pct_start=0.2)
    images = torch.from_numpy(data.images)
    photos = torch.from_numpy(data.photos)
    labels = torch.from_numpy(data.labels)
    outliers = torch.from_numpy(data.outliers)
    train_idx = torch.from_numpy(data.train_idx)
    for epoch in range(cfg.epochs):
        model.train()
        start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for step in range(steps):
            idx = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            use_photo = (torch.rand(len(idx), generator=g) < cfg.photo_fraction).view(-1, 1, 1)
            pixels = torch.where(use_photo, photos[idx], images[idx])
            if cfg.outliers_per_batch:
                pick = torch.randint(0, len(outliers), (cfg.outliers_per_batch,), generator=g)
                pixels = torch.cat([pixels, outliers[pick]])
            x = _normalize(augment(_to_input(pixels), cfg, g)).contiguous(memory_format=torch.channels_last)
            logits = model(x)
            fashion, other = logits[: len(idx)], logits[len(idx):]
            loss = F.cross_entropy(fashion, labels[idx])
            if len(other):
                # Outlier exposure: cross-entropy to the uniform distribution over classes.
                loss = loss + cfg.outlier_weight * -F.log_softmax(other, dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((fashion.argmax(1) == labels[idx]).sum())
            seen += len(idx)
        acc_orig, acc_photo = holdout_accuracy(model, data)
        log(f"epoch {epoch + 1:2d}/{cfg.epochs}  loss {total_loss / seen:.4f}  "
            f"train {100 * correct / seen:.2f}%  holdout {100 * acc_orig:.2f}% "
            f"(photos {100 * acc_photo:.2f}%)  {time.perf_counter() - start:.0f} s")
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, pixels: np.ndarray, batch: int = 1000) -> torch.Tensor:
    model.eval()
    out = [model(_normalize(_to_input(pixels[i: i + batch])).contiguous(memory_format=torch.channels_last))
           for i in range(0, len(pixels), batch)]
    return torch.cat(out)


def holdout_accuracy(model: nn.Module, data: Data) -> tuple[float, float]:
    y = torch.from_numpy(data.labels[data.holdout_idx])
    orig = logits_of(model, data.images[data.holdout_idx]).argmax(1) == y
    photo = logits_of(model, data.photos[data.holdout_idx]).argmax(1) == y
    return float(orig.float().mean()), float(photo.float().mean())


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimizing held-out NLL (Guo et al. 2017), fitted in log space."""
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.exp().item()


# -------------------------------------------------------------------------------------------- export

class CalibratedClassifier(nn.Module):
    """The network with BatchNorm folded into the convolutions and softmax(logits / T) appended."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.net = fold_batchnorm(model)
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(image) * self.inv_temperature, dim=1)


def fold_batchnorm(model: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for module in model.eval().children():
        if isinstance(module, nn.BatchNorm2d) and isinstance(layers[-1], nn.Conv2d):
            layers[-1] = torch.nn.utils.fusion.fuse_conv_bn_eval(layers[-1], module)
        else:
            layers.append(module)
    return nn.Sequential(*layers).eval()


def export_onnx(model: nn.Module, temperature: float, path: Path) -> None:
    import onnx

    wrapped = CalibratedClassifier(model, temperature).eval().to(memory_format=torch.contiguous_format)
    example = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation notice; it is what we want here
        torch.onnx.export(wrapped, (example,), str(path),
                          input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    if "BatchNormalization" in ops:
        raise RuntimeError(f"BatchNorm was not folded: {sorted(ops)}")


def check_export(model: nn.Module, temperature: float, path: Path, pixels: np.ndarray) -> float:
    """Largest difference between the ONNX model and torch on real inputs, at two batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _normalize(_to_input(pixels)).numpy()
    with torch.no_grad():
        expected = torch.softmax(logits_of(model, pixels) / temperature, dim=1).numpy()
    got = np.concatenate([session.run(None, {"image": x[:1]})[0], session.run(None, {"image": x[1:]})[0]])
    return float(np.abs(got - expected).max())


def write_manifest(folder: Path, temperature: float, min_confidence: float) -> None:
    manifest = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "description": "Compact CNN trained on Fashion-MNIST and product-photo renderings of it; "
                       "calibrated softmax in the graph.",
        "file": "model.onnx",
        "labels": list(fashion_mnist.LABELS),
        "input": {"name": "image", "shape": [1, 28, 28], "layout": "NCHW", "datatype": "FP32"},
        "output": {"name": "probabilities", "kind": "probabilities"},
        "color_mode": "L",
        "normalization": {"mean": [MEAN], "std": [STD]},
        "background": "dark",
        "temperature": round(temperature, 4),
        "min_confidence": min_confidence,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def choose_min_confidence(top_confidence: dict[str, np.ndarray]) -> float:
    """The lowest threshold on a 0.05 grid that marks at least 99% of each held-out non-fashion kind
    uncertain, and never below 0.5: the model is calibrated, so below 0.5 an answer is more likely
    wrong than right."""
    worst = max(float(np.percentile(c, 99)) for c in top_confidence.values())
    return round(max(0.5, math.ceil(worst / 0.05 - 1e-9) * 0.05), 2)


# ----------------------------------------------------------------------------------------- model card

# ----------------------------------------------------------------------------------------------- main

def _overrides(items: list[str], defaults: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            raise SystemExit(f"--set {item}: TrainConfig has no field {key!r}")
        current = getattr(defaults, key)
        if isinstance(current, tuple):
            out[key] = tuple(int(v) for v in value.split(","))
        else:
            out[key] = type(current)(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.inference.training",
                                     description=__doc__.split("\n")[0])
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, default=evaluation.DEFAULT_MODEL_DIR,
                        help="model folder to write")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/fashion-mnist-cache"),
                        help="where rendered training images are cached")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--eval-photos", type=int, default=10000, help="photo-style test images for the card")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any TrainConfig field, e.g. --set erase=0.1 (for experiments)")
    args = parser.parse_args(argv)
    if args.eval_photos < 1:
        parser.error("--eval-photos must be at least 1: the model card reports photo-style accuracy")
    cfg = replace(TrainConfig(seed=args.seed, epochs=args.epochs, threads=args.threads),
                  **_overrides(args.set, TrainConfig()))

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    log(f"config {asdict(cfg)}")
    log(f"loading data and renderings (cache {args.cache})")
    data = load_data(cfg, args.cache, log)
    log(f"model: {multiply_adds(FashionCNN(cfg.widths)) / 1e6:.2f} M multiply-adds per image, "
        f"{sum(p.numel() for p in FashionCNN(cfg.widths).parameters()):,} parameters")
    train_start = time.perf_counter()
    model = train(cfg, data, log)
    train_s = time.perf_counter() - train_start

    hold = data.holdout_idx
    y = torch.from_numpy(np.concatenate([data.labels[hold], data.labels[hold]]))
    logits = torch.cat([logits_of(model, data.images[hold]), logits_of(model, data.photos[hold])])
    temperature = fit_temperature(logits, y)
    log(f"temperature {temperature:.4f} (held-out NLL {F.cross_entropy(logits, y):.4f} -> "
        f"{F.cross_entropy(logits / temperature, y):.4f})")
    outlier_conf = {k: torch.softmax(logits_of(model, v) / temperature, 1).max(1).values.numpy()
                    for k, v in data.outliers_holdout.items()}
    fashion_conf = torch.softmax(logits / temperature, 1).max(1).values.numpy()
    min_confidence = choose_min_confidence(outlier_conf)
    for kind, conf in outlier_conf.items():
        log(f"held-out {kind}: confidence p50 {np.median(conf):.3f} p99 {np.percentile(conf, 99):.3f}")
    log(f"min_confidence {min_confidence:.2f}: marks {100 * (fashion_conf < min_confidence).mean():.1f}% "
        f"of held-out fashion images uncertain")

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / quantization.FLOAT_FILE
    export_onnx(model, temperature, onnx_path)
    diff = check_export(model, temperature, onnx_path, data.images[hold[:256]])
    log(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e3:.0f} kB), max |onnx - torch| = {diff:.2e}")
    if diff > 1e-4:
        raise RuntimeError(f"ONNX export disagrees with torch by {diff}")
    write_manifest(args.out, temperature, min_confidence)
    log("quantizing to int8 for the CPU (model.onnx); the float model stays for CUDA")
    quantization.quantize_folder(args.out)

    log("evaluating the exported model folder through the service preprocessing")
    metrics = evaluation.evaluate(args.out, photos=args.eval_photos, log=log)
    metrics["fp32"] = evaluation.evaluate(args.out, photos=0, non_fashion=0, file=quantization.FLOAT_FILE)
    metrics["training"] = {"config": asdict(cfg), "train_seconds": round(train_s),
                           "total_seconds": round(time.perf_counter() - started),
                           "multiply_adds": multiply_adds(FashionCNN(cfg.widths)),
                           "parameters": sum(p.numel() for p in model.parameters()),
                           "torch": torch.__version__, "opset": OPSET,
                           "holdout_nll": float(F.cross_entropy(logits, y)),
                           "holdout_nll_calibrated": float(F.cross_entropy(logits / temperature, y))}
    evaluation.write_artifacts(metrics, fashion_mnist.LABELS, args.out)
    write_model_card(args.out, metrics, ModelManifest.load(args.out))
    print(evaluation.format_report(metrics))
    log(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
