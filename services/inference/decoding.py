"""Image decoding (and, on the CPU, the model run) in worker processes, off the service's GIL,
driven from the event loop.

Decoding an image is mostly Python inside Pillow; done in the service process, every step
competes for the GIL with the event loop that serves the gRPC calls, and each image ends up
costing several times its decode (docs/performance.md has the measurements). A `WorkerPool`
keeps one worker process per batch in flight. The event loop writes a batch to an idle worker's
socket and awaits the answer like any other I/O: no thread of the service takes part, so a batch
costs no GIL hand-off between threads. The workers run the same `Preprocessor` as everything else.

Given a model (`WorkerModel`), each worker also opens its own ONNX Runtime session on the CPU and
answers with the model's outputs: the batch (encoded images and KServe tensors alike) never comes
back into the service process, two batches run the model at once, one per worker on its share of
the cores, and the service process does nothing per batch but write the request and read the
probabilities.

The workers run at a lower CPU priority than the service (`nice`, 10 steps by default): the event
loop is the one stage every call passes through, and when it and a worker both want a core, the
loop should have it.

A worker that dies (a decoder crash on a hostile file, an OOM kill) is restarted and the batch
retried once in the new one; if that dies too, the batch's images fail with a clear reason and
the service goes on serving.

    python -m services.inference.decoding FD NICE    # a worker (started by WorkerPool, not by hand)
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import pickle
import socket
import struct
import subprocess
import sys
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

Item = np.ndarray | list[bytes]
"""One request's part of a batch: preprocessed rows (N, ...), or encoded images."""


class WorkerCrashed(RuntimeError):
    """A worker process died while decoding a batch."""


class ModelRunFailed(RuntimeError):
    """The model failed on a batch inside a worker."""


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


# The same over the wire: per unusable image (position, an ImageRejected?, the reason); and why
# the model failed on the batch, if it did.
Wire = tuple[np.ndarray | None, list[tuple[int, bool, str]], list[float], float | None, str | None]


@dataclass(frozen=True)
class WorkerModel:
    """The model a worker runs on the CPU after decoding, with `threads` ONNX Runtime threads."""

    manifest: ModelManifest
    threads: int = 1


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


def _to_wire(decoded: Decoded, failure: str | None = None) -> Wire:
    return decoded.rows, [(i, isinstance(e, ImageRejected), str(e) if isinstance(e, ImageRejected)
                           else f"{type(e).__name__}: {e}") for i, e in decoded.errors.items()], \
        decoded.took, decoded.compute_s, failure


def _header(n: int) -> bytes:
    """multiprocessing.Connection's framing, which the worker reads and writes."""
    return struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)


class _Worker(asyncio.Protocol):
    """One worker process, and the event loop's end of its socket: one request at a time."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.transport: asyncio.Transport | None = None
        self.dead = False
        self._buffer = bytearray()
        self._reply: asyncio.Future[bytes] | None = None
        self._abandoned = 0

    @classmethod
    async def start(cls, prepare: Preprocessor, name: str, model: WorkerModel | None, nice: int) -> _Worker:
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        try:
            # fork+exec off the event loop: it takes milliseconds
            proc = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-m", "services.inference.decoding", str(child.fileno()), str(nice)],
                pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        try:
            parent.setblocking(False)
            _, worker = await asyncio.get_running_loop().create_unix_connection(lambda: cls(name, proc), sock=parent)
        except BaseException:
            parent.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            raise
        worker._send(pickle.dumps((prepare, model), protocol=5))
        return worker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (n,) = struct.unpack_from("!i", self._buffer)
            start = 4
            if n == -1:
                if len(self._buffer) < 12:
                    return
                (n,) = struct.unpack_from("!Q", self._buffer, 4)
                start = 12
            if len(self._buffer) < start + n:
                return
            message = bytes(self._buffer[start: start + n])
            del self._buffer[: start + n]
            if self._abandoned:  # the answer to a request whose caller was cancelled
                self._abandoned -= 1
            elif self._reply is not None and not self._reply.done():
                self._reply.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(self._died())

    def _died(self) -> WorkerCrashed:
        return WorkerCrashed(f"worker process {self.name} (pid {self.proc.pid}) died: exit status {self.proc.poll()}")

    def _send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_header(len(payload)) + payload)

    async def call(self, items: Sequence[Item], run_model: bool) -> Decoded:
        if self.dead:
            raise self._died()
        self._reply = asyncio.get_running_loop().create_future()
        self._send(pickle.dumps((list(items), run_model), protocol=5))
        try:
            reply = await self._reply
        except asyncio.CancelledError:
            self._abandoned += self._reply.cancelled()  # no answer yet: it will come
            raise
        finally:
            self._reply = None
        rows, errors, took, compute_s, failure = pickle.loads(reply)
        if failure is not None:
            raise ModelRunFailed(failure)
        return Decoded(rows, {i: (ImageRejected(why) if rejected else RuntimeError(why))
                              for i, rejected, why in errors}, took, compute_s)

    async def close(self, wait_s: float = 5.0) -> None:
        if self.transport is not None:
            self.transport.close()  # the worker reads EOF and exits
        try:
            await asyncio.to_thread(self.proc.wait, wait_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


class WorkerPool:
    """`processes` worker processes, used from the event loop they were opened on; `run` may be
    awaited by that many batches at once. With a `model`, the workers answer with the model's
    outputs (see the module's docstring)."""

    def __init__(self, prepare: Preprocessor, model: WorkerModel | None, nice: int) -> None:
        self._prepare = prepare
        self.model = model
        self.nice = nice
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: list[_Worker] = []

    @classmethod
    async def open(cls, prepare: Preprocessor, processes: int, model: WorkerModel | None = None,
                   nice: int = 0) -> WorkerPool:
        """Start the workers, `nice` steps below this process's CPU priority, and put one image
        through each: a worker that cannot start (or open its model) fails here, visibly."""
        if processes < 1:
            raise ValueError("a worker pool needs at least one process")
        pool = cls(prepare, model, nice)
        try:
            for i in range(processes):
                pool._workers.append(await _Worker.start(prepare, f"#{i + 1}", model, nice))
            buf = io.BytesIO()
            Image.new("L", (prepare.width, prepare.height)).save(buf, format="PNG")
            for worker in pool._workers:
                rows, failed, _, _ = await worker.call([[buf.getvalue()]], model is not None)
                if failed or rows is None or len(rows) != 1 or not np.all(np.isfinite(rows)):
                    raise WorkerCrashed(f"worker process {worker.name} could not decode a blank image: "
                                         f"{failed or (None if rows is None else rows.shape)}")
        except BaseException:
            await pool.close()
            raise
        for worker in pool._workers:
            pool._idle.put_nowait(worker)
        log.info("Decoding images%s in %d worker processes (pids %s)",
                 f" and running the model ({model.threads} ONNX Runtime thread(s) each)" if model else "",
                 processes, ", ".join(map(str, pool.pids)))
        return pool

    @property
    def runs_model(self) -> bool:
        return self.model is not None

    @property
    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._workers]

    async def _replace(self, dead: _Worker) -> _Worker:
        """A fresh worker in the dead one's place. When none can be started (out of processes or
        memory), this raises and the dead one stays as a placeholder, to be replaced at its next
        use, so that the pool never runs dry and hangs its callers."""
        self._workers.remove(dead)
        await dead.close(wait_s=1.0)
        try:
            worker = await _Worker.start(self._prepare, dead.name, self.model, self.nice)
        except BaseException:
            self._workers.append(dead)
            raise
        self._workers.append(worker)
        return worker

    async def run(self, items: Sequence[Item]) -> Decoded:
        """The batch `items` (KServe tensors only where the workers run the model): the model's
        outputs for every usable row, in request order, when the workers run the model, else the
        tensors of the usable encoded images, in order; and why each other image (by position
        among the encoded images) is unusable. Raises ModelRunFailed when the model fails on it.
        A worker found dead is replaced and the batch retried once, in the fresh one."""
        if not self.runs_model and any(isinstance(item, np.ndarray) for item in items):
            raise TypeError("these workers do not run the model: send them encoded images only")
        worker = await self._idle.get()
        try:
            if worker.dead:  # died while idle (an OOM kill, say): replace it before use
                log.error("worker process %s (pid %d) died while idle: exit status %s; restarting it",
                          worker.name, worker.proc.pid, worker.proc.poll())
                worker = await self._replace(worker)
            for attempt in (1, 2):
                try:
                    return await worker.call(items, self.runs_model)
                except WorkerCrashed as exc:
                    log.error("%s during a batch of %d images; restarting it%s", exc, len(encoded_images(items)),
                              " and retrying the batch" if attempt == 1 else "")
                    worker = await self._replace(worker)
        finally:
            self._idle.put_nowait(worker)
        reason = ImageRejected("the image decoder crashed twice on the batch this image was in; "
                               "if this image is damaged, it may be the cause")
        n = len(encoded_images(items))
        return Decoded(None, dict.fromkeys(range(n), reason), [0.0] * n)

    async def close(self) -> None:
        workers, self._workers = self._workers, []
        await asyncio.gather(*(worker.close() for worker in workers))


def _serve(fd: int) -> None:
    conn = Connection(fd)
    prepare: Preprocessor
    spec: WorkerModel | None
    prepare, spec = pickle.loads(conn.recv_bytes())
    model = None
    if spec is not None:
        from services.inference.engine import OnnxModel  # workers that only decode never load ONNX Runtime

        model = OnnxModel(spec.manifest, "cpu", intra_op_threads=spec.threads)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the service closed the pool or is gone
        items, run_model = pickle.loads(message)
        decoded = decode_images(prepare, encoded_images(items))
        failure = None
        if run_model and model is not None:
            pieces = model_inputs(items, decoded.rows, request_errors(items, decoded.errors))
            outputs = None
            t = time.perf_counter()
            try:
                if pieces:
                    outputs = model.run(concat(pieces))
            except Exception as exc:  # as in the service process: the whole batch fails with it
                failure = f"model run failed: {type(exc).__name__}: {exc}"
            decoded = decoded._replace(rows=outputs, compute_s=time.perf_counter() - t if pieces else None)
        conn.send_bytes(pickle.dumps(_to_wire(decoded, failure), protocol=5))


if __name__ == "__main__":
    import signal

    # Ctrl-C (or a SIGTERM to the process group) must not kill us under batches still draining:
    # we exit when the service closes our socket, or when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(int(sys.argv[2]))
    _serve(int(sys.argv[1]))
