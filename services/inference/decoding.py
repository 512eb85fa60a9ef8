"""Image decoding (and, on the CPU, the model run) in helper processes, off the service's GIL.

Decoding a small PNG costs about 50 µs, most of it Python inside Pillow; done on the engine
thread, every step competes for the GIL with the event loop that serves the gRPC calls, and
each image ends up costing several times that (measured: ClassifyStream 3,700 images/s with
decoding in the service process, 6,300 with decoding free, 4,750 with these helpers). A
`DecoderPool` keeps one helper process per batch in flight; the engine thread sends a batch's
encoded images over a socket and waits, GIL released, for the stacked tensor and the reasons for
the images that could not be used (a lone image it decodes itself: see batcher.py). The helpers
run the same `Preprocessor` as everything else.

Given a model (`HelperModel`), each helper also opens its own ONNX Runtime session on the CPU and
answers a large batch with the model's outputs instead of the tensors: the batch never comes back
into the service process, two batches run the model at once (one per helper, each on its share
of the cores) instead of one after the other, and the engine thread's work per batch (unpickling
tensors, concatenating, the session call) leaves the service's GIL as well. Measured A/B on 2
cores (medians of 2-4 runs each): ClassifyBatch +20-24%, ClassifyStream +15-17%, Classify at
concurrency 64 +3%, at concurrency 16 unchanged.

A helper that dies (a decoder crash on a hostile file, an OOM kill) is restarted and the batch
retried once in the new one; if that dies too, the batch's images fail with a clear reason and
the service goes on serving.

    python -m services.inference.decoding FD    # a helper (started by DecoderPool, not by hand)
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.model import ModelManifest

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


class DecoderCrashed(RuntimeError):
    """A helper process died while decoding a batch."""


class Decoded(NamedTuple):
    """A batch's answer."""

    rows: np.ndarray | None
    """The usable images' tensors in order, or their model outputs when `compute_s` is set (None: no usable image)."""
    errors: dict[int, Exception]
    """Per unusable image, its position and why."""
    took: list[float]
    """Decode time of each image, seconds."""
    compute_s: float | None = None
    """Set when a helper ran the model on the tensors: how long that took, seconds."""


# The same over the wire: per unusable image (position, an ImageRejected?, the reason).
Wire = tuple[np.ndarray | None, list[tuple[int, bool, str]], list[float], float | None]


@dataclass(frozen=True)
class HelperModel:
    """The model a helper runs on the CPU after decoding, with `threads` ONNX Runtime threads, for
    batches of at least `min_batch` images; smaller ones come back as tensors, for the service's
    session: there a small batch's run has every core, and at concurrency 16 (batches of about
    5) Classify was measured 6% slower with the helpers running them."""

    manifest: ModelManifest
    threads: int = 1
    min_batch: int = 16


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


def _to_wire(decoded: Decoded) -> Wire:
    return decoded.rows, [(i, isinstance(e, ImageRejected), str(e) if isinstance(e, ImageRejected)
                           else f"{type(e).__name__}: {e}") for i, e in decoded.errors.items()], \
        decoded.took, decoded.compute_s


class _Helper:
    """One helper process and the parent's end of its socket."""

    def __init__(self, prepare: Preprocessor, name: str, model: HelperModel | None) -> None:
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.inference.decoding", str(child.fileno())],
            pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send_bytes(pickle.dumps((prepare, model), protocol=5))
        self.name = name

    def decode(self, images: Sequence[bytes], run_model: bool) -> Decoded:
        try:
            self.conn.send_bytes(pickle.dumps((list(images), run_model), protocol=5))
            rows, errors, took, compute_s = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise DecoderCrashed(f"image decoder {self.name} (pid {self.proc.pid}) died: "
                                 f"exit status {self.proc.poll()}") from exc
        return Decoded(rows, {i: (ImageRejected(why) if rejected else RuntimeError(why))
                              for i, rejected, why in errors}, took, compute_s)

    def close(self, timeout: float = 5.0) -> None:
        self.conn.close()  # the helper reads EOF and exits
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class DecoderPool:
    """`processes` helper processes; `decode` may be called from that many threads at once.
    With a `model`, the helpers answer with the model's outputs (see the module's docstring)."""

    def __init__(self, prepare: Preprocessor, processes: int, model: HelperModel | None = None) -> None:
        if processes < 1:
            raise ValueError("a decoder pool needs at least one process")
        self._prepare = prepare
        self.model = model
        self._idle: queue.SimpleQueue[_Helper] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._helpers: list[_Helper] = []
        for i in range(processes):
            self._add(f"#{i + 1}")
        self._warm_up()
        log.info("Decoding images%s in %d helper processes (pids %s)",
                 f" and running the model ({model.threads} ONNX Runtime thread(s) each)" if model else "",
                 processes, ", ".join(str(h.proc.pid) for h in self._helpers))

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [h.proc.pid for h in self._helpers]

    def _warm_up(self) -> None:
        """One image through every helper: a helper that cannot start (or open its model) fails the
        model load, visibly."""
        buf = io.BytesIO()
        Image.new("L", (self._prepare.width, self._prepare.height)).save(buf, format="PNG")
        helpers = [self._idle.get() for _ in range(len(self._helpers))]
        try:
            for h in helpers:
                rows, failed, _, _ = h.decode([buf.getvalue()], True)
                if failed or rows is None or len(rows) != 1 or not np.all(np.isfinite(rows)):
                    raise DecoderCrashed(f"image decoder {h.name} could not decode a blank image: "
                                         f"{failed or (None if rows is None else rows.shape)}")
        except DecoderCrashed:
            self.close()
            raise
        for h in helpers:
            self._idle.put(h)

    def _add(self, name: str, idle: bool = True) -> _Helper:
        helper = _Helper(self._prepare, name, self.model)
        with self._lock:
            self._helpers.append(helper)
        if idle:
            self._idle.put(helper)
        return helper

    def _replace(self, dead: _Helper) -> _Helper:
        """A fresh helper in the dead one's place, handed to the caller (not queued as idle). When
        none can be started (out of processes or memory), the dead one goes back to the idle queue
        as a placeholder, so that the pool never runs dry and hangs its callers, and this raises."""
        with self._lock:
            self._helpers.remove(dead)
        dead.close(timeout=1.0)
        try:
            return self._add(dead.name, idle=False)
        except Exception:
            with self._lock:
                self._helpers.append(dead)
            self._idle.put(dead)
            raise

    def decode(self, images: Sequence[bytes]) -> Decoded:
        """Tensors of the usable images (their model outputs, for a batch the helpers run the
        model on), in order, and why each other image (by position) is unusable.
        A helper found dead is replaced and the batch retried once, in the fresh one."""
        run_model = self.model is not None and len(images) >= self.model.min_batch
        helper = self._idle.get()
        if helper.proc.poll() is not None:  # died while idle (an OOM kill, say): replace it before use
            log.error("image decoder %s (pid %d) died while idle: exit status %s; restarting it",
                      helper.name, helper.proc.pid, helper.proc.returncode)
            helper = self._replace(helper)
        for attempt in (1, 2):
            try:
                result = helper.decode(images, run_model)
            except DecoderCrashed as exc:
                log.error("%s while decoding %d images; restarting it%s", exc, len(images),
                          " and retrying the batch" if attempt == 1 else "")
                helper = self._replace(helper)
                continue
            self._idle.put(helper)
            return result
        self._idle.put(helper)
        reason = ImageRejected("the image decoder crashed twice on the batch this image was in; "
                               "if this image is damaged, it may be the cause")
        return Decoded(None, dict.fromkeys(range(len(images)), reason), [0.0] * len(images))

    def close(self) -> None:
        with self._lock:
            helpers, self._helpers = self._helpers, []
        for h in helpers:
            h.close()


def _serve(fd: int) -> None:
    conn = Connection(fd)
    prepare: Preprocessor
    spec: HelperModel | None
    prepare, spec = pickle.loads(conn.recv_bytes())
    model = None
    if spec is not None:
        from services.inference.engine import OnnxModel  # helpers that only decode never load ONNX Runtime

        model = OnnxModel(spec.manifest, "cpu", intra_op_threads=spec.threads)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the service closed the pool or is gone
        images, run_model = pickle.loads(message)
        decoded = decode_images(prepare, images)
        if run_model and model is not None and decoded.rows is not None:
            t = time.perf_counter()
            try:
                decoded = decoded._replace(rows=model.run(decoded.rows), compute_s=time.perf_counter() - t)
            except Exception as exc:  # as in the service process: the batch's usable images fail with it
                failed = RuntimeError(f"model run failed: {type(exc).__name__}: {exc}")
                decoded = Decoded(None, {i: decoded.errors.get(i, failed) for i in range(len(decoded.took))},
                                  decoded.took)
        conn.send_bytes(pickle.dumps(_to_wire(decoded), protocol=5))


if __name__ == "__main__":
    import signal

    # Ctrl-C (or a SIGTERM to the process group) must not kill us under batches still draining:
    # we exit when the service closes our socket, or when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _serve(int(sys.argv[1]))
