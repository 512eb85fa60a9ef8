"""A batch's items and their decoding, in whichever process decodes them (an engine thread of the
service, or a worker process: services/inference/workers/): encoded images decoded one by one with
the model's `Preprocessor`, each failing alone, and the results split back by request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

Item = np.ndarray | list[bytes]
"""One request's part of a batch: preprocessed rows (N, ...), or encoded images."""


class Decoded(NamedTuple):
    """A batch's answer."""

    rows: np.ndarray | None
    """The usable images' tensors in order, or, when `compute_s` is set, the model's outputs for
    every usable row of the batch in request order (None: no usable row)."""
    errors: dict[int, Exception]
    """Per unusable image, its position among the batch's encoded images, and why."""
    took: list[float]
    """Decode time of each image, seconds."""
    compute_s: float | None = None
    """Set when a worker ran the model: how long that took, seconds."""


def decode_images(prepare: Callable[[bytes], np.ndarray], images: Sequence[bytes]) -> Decoded:
    """Decode `images` with `prepare`, in this process; an image that fails fails alone."""
    rows: list[np.ndarray] = []
    errors: dict[int, Exception] = {}
    took: list[float] = []
    for i, data in enumerate(images):
        t = time.perf_counter()
        try:
            rows.append(prepare(data))
        except Exception as exc:  # ImageRejected, or a Pillow bug on some file: not the batch's fault
            errors[i] = exc
        took.append(time.perf_counter() - t)
    return Decoded((np.stack(rows) if rows else None), errors, took)


def encoded_images(items: Sequence[Item]) -> list[bytes]:
    """The batch's encoded images, in order (their positions are those of `Decoded.errors`)."""
    return [image for item in items if not isinstance(item, np.ndarray) for image in item]


def request_errors(items: Sequence[Item], failed: dict[int, Exception]) -> list[dict[int, Exception]]:
    """`failed` (by position among the batch's encoded images) split by request: per request,
    image position within the request -> why it could not be used."""
    errors: list[dict[int, Exception]] = [{} for _ in items]
    if failed:
        at = 0
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                continue
            errors[i] = {j: failed[at + j] for j in range(len(item)) if at + j in failed}
            at += len(item)
    return errors


def model_inputs(items: Sequence[Item], rows: np.ndarray | None,
                 errors: list[dict[int, Exception]]) -> list[np.ndarray]:
    """The model's input pieces in request order: arrays as they came, each request's usable
    decoded rows (from `rows`, the batch's decoded images in order) in its place."""
    pieces: list[np.ndarray] = []
    row = 0
    for item, errs in zip(items, errors, strict=True):
        if isinstance(item, np.ndarray):
            pieces.append(item)
        elif usable := len(item) - len(errs):
            assert rows is not None
            pieces.append(rows[row: row + usable])
            row += usable
    return pieces


def concat(pieces: list[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
