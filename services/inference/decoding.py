"""Image decoding in helper processes, off the service's GIL.

Decoding a small PNG costs about 50 µs, most of it Python inside Pillow; done on the engine
thread, every step competes for the GIL with the event loop that serves the gRPC calls, and
each image ends up costing several times that (measured: ClassifyStream 3,700 images/s with
decoding in the service process, 6,300 with decoding free, 4,750 with these helpers). A
`DecoderPool` keeps one helper process per batch in flight; the engine thread sends a batch's
encoded images over a socket and waits, GIL released, for the stacked tensor and the reasons for
the images that could not be used (a lone image it decodes itself: see batcher.py). The helpers
run the same `Preprocessor` as everything else.

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
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
from PIL import Image

from services.inference.imaging import ImageRejected, Preprocessor

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


class DecoderCrashed(RuntimeError):
    """A helper process died while decoding a batch."""


# A batch's answer: the tensors of the usable images in order (None when there are none), per
# unusable image its position and why, and the decode time of each image in seconds.
Decoded = tuple[np.ndarray | None, dict[int, Exception], list[float]]
# The same over the wire: per unusable image (position, an ImageRejected?, the reason).
Wire = tuple[np.ndarray | None, list[tuple[int, bool, str]], list[float]]


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
    return (np.stack(rows) if rows else None), errors, took


def _to_wire(decoded: Decoded) -> Wire:
    tensors, errors, took = decoded
    return tensors, [(i, isinstance(e, ImageRejected), str(e) if isinstance(e, ImageRejected)
                      else f"{type(e).__name__}: {e}") for i, e in errors.items()], took


class _Helper:
    """One helper process and the parent's end of its socket."""

    def __init__(self, prepare: Preprocessor, name: str) -> None:
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.inference.decoding", str(child.fileno())],
            pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        child.close()
        self.conn = Connection(parent.detach())
        self.conn.send_bytes(pickle.dumps(prepare, protocol=5))
        self.name = name

    def decode(self, images: Sequence[bytes]) -> Decoded:
        try:
            self.conn.send_bytes(pickle.dumps(list(images), protocol=5))
            tensors, errors, took = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise DecoderCrashed(f"image decoder {self.name} (pid {self.proc.pid}) died: "
                                 f"exit status {self.proc.poll()}") from exc
        return tensors, {i: (ImageRejected(why) if rejected else RuntimeError(why))
                         for i, rejected, why in errors}, took

    def close(self, timeout: float = 5.0) -> None:
        self.conn.close()  # the helper reads EOF and exits
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class DecoderPool:
    """`processes` helper processes; `decode` may be called from that many threads at once."""

    def __init__(self, prepare: Preprocessor, processes: int) -> None:
        if processes < 1:
            raise ValueError("a decoder pool needs at least one process")
        self._prepare = prepare
        self._idle: queue.SimpleQueue[_Helper] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._helpers: list[_Helper] = []
        for i in range(processes):
            self._add(f"#{i + 1}")
        self._warm_up()
        log.info("Decoding images in %d helper processes (pids %s)", processes,
                 ", ".join(str(h.proc.pid) for h in self._helpers))

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [h.proc.pid for h in self._helpers]

    def _warm_up(self) -> None:
        """One image through every helper: a helper that cannot start fails the model load, visibly."""
        buf = io.BytesIO()
        Image.new("L", (self._prepare.width, self._prepare.height)).save(buf, format="PNG")
        helpers = [self._idle.get() for _ in range(len(self._helpers))]
        try:
            for h in helpers:
                tensors, failed, _ = h.decode([buf.getvalue()])
                if failed or tensors is None:
                    raise DecoderCrashed(f"image decoder {h.name} could not decode a blank image: {failed}")
        except DecoderCrashed:
            self.close()
            raise
        for h in helpers:
            self._idle.put(h)

    def _add(self, name: str, idle: bool = True) -> _Helper:
        helper = _Helper(self._prepare, name)
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
        """Tensors of the usable images, in order, and why each other image (by position) is unusable.
        A helper found dead is replaced and the batch retried once, in the fresh one."""
        helper = self._idle.get()
        if helper.proc.poll() is not None:  # died while idle (an OOM kill, say): replace it before use
            log.error("image decoder %s (pid %d) died while idle: exit status %s; restarting it",
                      helper.name, helper.proc.pid, helper.proc.returncode)
            helper = self._replace(helper)
        for attempt in (1, 2):
            try:
                result = helper.decode(images)
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
        return None, dict.fromkeys(range(len(images)), reason), [0.0] * len(images)

    def close(self) -> None:
        with self._lock:
            helpers, self._helpers = self._helpers, []
        for h in helpers:
            h.close()


def _serve(fd: int) -> None:
    conn = Connection(fd)
    prepare: Preprocessor = pickle.loads(conn.recv_bytes())
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the service closed the pool or is gone
        conn.send_bytes(pickle.dumps(_to_wire(decode_images(prepare, pickle.loads(message))), protocol=5))


if __name__ == "__main__":
    import signal

    # Ctrl-C (or a SIGTERM to the process group) must not kill us under batches still draining:
    # we exit when the service closes our socket, or when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _serve(int(sys.argv[1]))
