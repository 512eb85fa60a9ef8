"""The Inference service's end of its worker processes: a `WorkerPool` of processes started from the
event loop, each reached through its socket as an asyncio protocol, replaced when it dies.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from services.inference.decoding import Decoded, Item, encoded_images
from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.workers import wire
from services.inference.workers.wire import WorkerModel

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[3]
WORKER_MAIN = "services.inference.workers.process"
STALL_S = 5.0
"""A worker that used no CPU time for this long while a batch waits on it is hung (SIGSTOPped, or blocked
for good): it is killed, so that its batch is retried in a fresh worker instead of holding its callers
until their deadlines (or forever) while health says SERVING."""
WATCH_INTERVAL_S = 1.0
"""How often the pool looks at the CPU time of its workers that have a batch out."""


class WorkerCrashed(RuntimeError):
    """A worker process died while decoding a batch."""


class ModelRunFailed(RuntimeError):
    """The model failed on a batch inside a worker."""


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
        self.stalled = ""
        """Why the pool killed this worker as hung ("": it did not)."""

    @classmethod
    async def start(cls, prepare: Preprocessor, name: str, model: WorkerModel | None, nice: int) -> _Worker:
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        try:
            # fork+exec off the event loop: it takes milliseconds
            proc = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-m", WORKER_MAIN, str(child.fileno()), str(nice)],
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
        worker._send(wire.start_message(prepare, model))
        return worker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (message := wire.next_frame(self._buffer)) is not None:
            if self._abandoned:  # the answer to a request whose caller was cancelled
                self._abandoned -= 1
            elif self._reply is not None and not self._reply.done():
                self._reply.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(self._died())

    def _died(self) -> WorkerCrashed:
        if self.stalled:
            return WorkerCrashed(f"worker process {self.name} (pid {self.proc.pid}) {self.stalled}")
        return WorkerCrashed(f"worker process {self.name} (pid {self.proc.pid}) died: exit status {self.proc.poll()}")

    @property
    def awaited(self) -> bool:
        """Whether a caller waits for this worker's answer to a batch."""
        return self._reply is not None and not self._reply.done()

    def cpu_ticks(self) -> int | None:
        """The CPU time the process used so far (user + system, clock ticks); None once it is gone."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None
        return int(fields[11]) + int(fields[12])

    def _send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(wire.frame_header(len(payload)) + payload)

    async def call(self, items: Sequence[Item], run_model: bool) -> Decoded:
        if self.dead:
            raise self._died()
        self._reply = asyncio.get_running_loop().create_future()
        self._send(wire.batch_message(items, run_model))
        try:
            reply = await self._reply
        except asyncio.CancelledError:
            self._abandoned += self._reply.cancelled()  # no answer yet: it will come
            raise
        finally:
            self._reply = None
        decoded, failure = wire.read_reply(reply)
        if failure is not None:
            raise ModelRunFailed(failure)
        return decoded

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
        self._watchdog: asyncio.Task[None] | None = None

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
        pool._watchdog = asyncio.ensure_future(pool._watch())
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

    async def _watch(self) -> None:
        """Every WATCH_INTERVAL_S, kill the workers that a batch waits on and that used no CPU time for
        STALL_S: their callers' batch fails over to a fresh worker (run's retry). Off the batches' path:
        one read of /proc per awaited worker per interval, none while the pool is idle."""
        progress: dict[_Worker, tuple[int, float]] = {}  # per awaited worker: its CPU time, and since when
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = loop.time()
            for worker in list(self._workers):
                ticks = worker.cpu_ticks() if worker.awaited and not worker.dead else None
                if ticks is None:
                    progress.pop(worker, None)
                    continue
                seen, since = progress.get(worker, (-1, now))
                if ticks != seen:
                    progress[worker] = (ticks, now)
                elif now - since >= STALL_S:
                    progress.pop(worker, None)
                    worker.stalled = (f"made no progress for {now - since:.0f}s on a batch (stopped or hung): "
                                      "killed it")
                    worker.proc.kill()  # its socket closes: the batch's call ends with WorkerCrashed

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        workers, self._workers = self._workers, []
        await asyncio.gather(*(worker.close() for worker in workers))
