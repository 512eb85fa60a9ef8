"""What travels over a worker process's socket: multiprocessing.Connection's framing around pickled
messages. The service sends one start message (the preprocessing and, where the worker runs it, the
model), then one batch at a time; the worker answers each batch with its decoded rows (or the
model's outputs), why each unusable image is unusable, and why the model failed, if it did.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.inference.decoding import Decoded, Item
from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.model import ModelManifest

# A batch's answer over the wire: per unusable image (position, an ImageRejected?, the reason); and
# why the model failed on the batch, if it did.
Reply = tuple[np.ndarray | None, list[tuple[int, bool, str]], list[float], float | None, str | None]


@dataclass(frozen=True)
class WorkerModel:
    """The model a worker runs on the CPU after decoding, with `threads` ONNX Runtime threads: the
    file's contents `onnx` as the service read them at load (None: the worker reads the file)."""

    manifest: ModelManifest
    threads: int = 1
    onnx: bytes | None = None


def start_message(prepare: Preprocessor, model: WorkerModel | None) -> bytes:
    return pickle.dumps((prepare, model), protocol=5)


def read_start(message: bytes) -> tuple[Preprocessor, WorkerModel | None]:
    return pickle.loads(message)


def batch_message(items: Sequence[Item], run_model: bool) -> bytes:
    return pickle.dumps((list(items), run_model), protocol=5)


def read_batch(message: bytes) -> tuple[list[Item], bool]:
    return pickle.loads(message)


def reply_message(decoded: Decoded, failure: str | None = None) -> bytes:
    errors = [(i, isinstance(e, ImageRejected), str(e) if isinstance(e, ImageRejected) else f"{type(e).__name__}: {e}")
              for i, e in decoded.errors.items()]
    reply: Reply = (decoded.rows, errors, decoded.took, decoded.compute_s, failure)
    return pickle.dumps(reply, protocol=5)


def read_reply(message: bytes) -> tuple[Decoded, str | None]:
    """The batch's answer, and why the model failed on it (None: it did not)."""
    rows, errors, took, compute_s, failure = pickle.loads(message)
    return Decoded(rows, {i: (ImageRejected(why) if rejected else RuntimeError(why)) for i, rejected, why in errors},
                   took, compute_s), failure


def frame_header(n: int) -> bytes:
    """multiprocessing.Connection's framing of an `n`-byte message, which the worker reads and writes."""
    return struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)


def next_frame(buffer: bytearray) -> bytes | None:
    """The first whole message in `buffer`, removed from it; None until one has arrived."""
    if len(buffer) < 4:
        return None
    (n,) = struct.unpack_from("!i", buffer)
    start = 4
    if n == -1:
        if len(buffer) < 12:
            return None
        (n,) = struct.unpack_from("!Q", buffer, 4)
        start = 12
    if len(buffer) < start + n:
        return None
    message = bytes(buffer[start: start + n])
    del buffer[: start + n]
    return message
