"""Real test images: Fashion-MNIST when installed (Debian dataset-fashion-mnist), else drawn shapes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from services.inference import fashion_mnist


def fashion_images(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST test images (28x28 uint8) and labels."""
    x, y = fashion_mnist.load("test")
    return x[start: start + n], y[start: start + n]


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height pixels (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
