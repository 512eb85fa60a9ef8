"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package, and product-photo renderings of it.

Used by training, evaluation, tests and benchmarks; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

DATASET_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetMissing(FileNotFoundError):
    """The idx files are not installed (apt-get install dataset-fashion-mnist)."""


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(name: str, root: Path) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.exists():
            return candidate
    raise DatasetMissing(f"{name} not found in {root}: apt-get install dataset-fashion-mnist")


def load(split: Literal["train", "test"], root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8, light items on black, and labels (N,) uint8."""
    root = root or DATASET_DIR
    images_name, labels_name = _FILES[split]
    return _read_idx(_find(images_name, root)), _read_idx(_find(labels_name, root))


def available(root: Path | None = None) -> bool:
    try:
        _find(_FILES["test"][0], root or DATASET_DIR)
    except DatasetMissing:
        return False
    return True


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def render_product_photo(pixels: np.ndarray, rng: np.random.Generator, quality: int | None = None) -> bytes:
    """A 28x28 Fashion-MNIST image as a catalog photo: an upscaled, colored item on a light
    background, off-centre with margins, JPEG-compressed (a few hundred pixels a side)."""
    side = int(rng.integers(160, 320))
    item = Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)
    alpha = np.asarray(item, np.float32)[:, :, None] / 255.0
    color = _dark_enough_color(rng)
    paper = np.float32(rng.uniform(232, 255))
    rgb = paper * (1 - alpha) + color[None, None, :] * alpha
    canvas_w = int(side * rng.uniform(1.15, 1.8))
    canvas_h = int(side * rng.uniform(1.15, 1.8))
    canvas = np.full((canvas_h, canvas_w, 3), paper, np.float32)
    canvas += rng.normal(0, 1.5, canvas.shape).astype(np.float32)  # sensor noise on the backdrop
    top = int(rng.integers(0, canvas_h - side + 1))
    left = int(rng.integers(0, canvas_w - side + 1))
    canvas[top: top + side, left: left + side] = rgb
    buf = io.BytesIO()
    q = quality if quality is not None else int(rng.integers(70, 96))
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=q)
    return buf.getvalue()


def _dark_enough_color(rng: np.random.Generator) -> np.ndarray:
    """A random item color visibly darker than a white backdrop (luma at most about 170)."""
    while True:
        c = rng.uniform(0, 255, 3).astype(np.float32)
        if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] <= 170:
            return c


# Inputs that are not fashion items, for outlier exposure in training and for choosing and checking
# `min_confidence`: each comes back as encoded bytes, like an upload, so it goes through the real
# preprocessing (which stretches contrast and crops, turning near-blank pages into faint textures).
NON_FASHION_KINDS = ("blank", "noise", "text")
_WORDS_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def render_non_fashion(kind: str, rng: np.random.Generator) -> bytes:
    """One encoded image of the given kind: "blank", "noise" or "text"."""
    render = {"blank": render_blank_page, "noise": render_noise, "text": render_text_photo}.get(kind)
    if render is None:
        raise ValueError(f"unknown non-fashion kind {kind!r}; expected one of {NON_FASHION_KINDS}")
    return render(rng)


def render_blank_page(rng: np.random.Generator) -> bytes:
    """A photographed blank sheet: paper tone, uneven lighting, sensor noise; or a flat digital page."""
    h, w = (int(v) for v in rng.integers(160, 480, 2))
    if rng.random() < 0.15:
        level = int(rng.choice([255, int(rng.integers(200, 256)), 0]))
        return _encode(np.full((h, w, 3), level, np.uint8), rng)
    paper = rng.uniform(200, 255) * rng.uniform(0.94, 1.0, 3)  # slightly tinted
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h) * rng.uniform(0, 25)
    canvas = paper[None, None, :] + ramp[:, :, None] + rng.normal(0, rng.uniform(0.5, 3), (h, w, 1))
    return _encode(canvas, rng)


def render_noise(rng: np.random.Generator) -> bytes:
    """Random pixels: uniform color noise, gray Gaussian noise, or coarse noise blown up."""
    h, w = (int(v) for v in rng.integers(64, 480, 2))
    style = rng.integers(0, 3)
    if style == 0:
        canvas = rng.uniform(0, 256, (h, w, 3))
    elif style == 1:
        canvas = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (h, w, 1)).repeat(3, axis=2)
    else:
        cells = rng.uniform(0, 256, (int(rng.integers(8, 24)), int(rng.integers(8, 24)), 3))
        canvas = np.asarray(Image.fromarray(cells.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR))
    return _encode(canvas, rng)


def render_text_photo(rng: np.random.Generator) -> bytes:
    """A photo of a printed page or a label: lines of random words, usually dark ink on light paper."""
    from PIL import ImageDraw, ImageFont  # only needed here

    h, w = (int(v) for v in rng.integers(160, 480, 2))
    dark_on_light = rng.random() < 0.85
    paper = rng.uniform(215, 255, 3) if dark_on_light else rng.uniform(0, 70, 3)
    ink = rng.uniform(0, 90, 3) if dark_on_light else rng.uniform(190, 255, 3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in paper))
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(12, 56))
    font = ImageFont.load_default(size=size)  # bundled with Pillow: no system fonts needed
    y = int(rng.integers(2, max(3, h // 4)))
    margin = int(rng.integers(2, max(3, w // 5)))
    for _ in range(int(rng.integers(1, 14))):
        if y > h - size:
            break
        words = [
            "".join(rng.choice(list(_WORDS_ALPHABET), int(rng.integers(1, 10))))
            for _ in range(int(rng.integers(1, 8)))
        ]
        draw.text((margin, y), " ".join(words), fill=tuple(int(v) for v in ink), font=font)
        y += int(size * rng.uniform(1.1, 1.8))
    canvas = np.asarray(img, np.float32) + rng.normal(0, 1.5, (h, w, 1))
    return _encode(canvas, rng)


def _encode(canvas: np.ndarray, rng: np.random.Generator) -> bytes:
    """Mostly JPEG (as photos arrive), sometimes PNG."""
    buf = io.BytesIO()
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    if rng.random() < 0.8:
        img.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()
