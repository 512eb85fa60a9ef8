"""What the Inference server processes sharing one port (FASHION_INFERENCE_PROCESSES > 1) share:
a run folder where each publishes its statistics (GetStats counters, KServe ModelStatistics) and
whether its model is warm.

Each process rewrites `stats-<pid>.json` (atomically: a temporary file renamed over it) every
PUBLISH_INTERVAL_S and at once on SIGUSR1; when it stops, its last statistics become
`retired-<pid>.json`. GetStats and ModelStatistics, whichever process answers them, ask its live
siblings for fresh statistics (SIGUSR1), wait for them (at most FRESH_WAIT_S) and sum them with its
own current ones and with the `retired-<pid>.json` of processes that stopped or died (for one that
died, the parent renames its last file, so that its calls stay counted). A process reports SERVING
once every sibling's file says its model is warm. The parent (services.inference.processes) makes the folder
and says where it is, and when the service started, in the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_DIR_ENV = "_FASHION_INFERENCE_RUN_DIR"
STARTED_ENV = "_FASHION_INFERENCE_STARTED"
"""The service's start (Unix time, set by the parent): its uptime, whichever process answers."""
PUBLISH_INTERVAL_S = 1.0
FRESH_WAIT_S = 0.5


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Siblings:
    """This server process's file in the run folder, and its view of the others'."""

    def __init__(self, run_dir: Path, processes: int, statistics: Callable[[], dict[str, Any]],
                 ready: Callable[[], bool]) -> None:
        """`statistics`: what this process publishes (JSON values), `ready`: whether its model is warm."""
        self.run_dir = run_dir
        self.processes = processes
        self.pid = os.getpid()
        self.path = run_dir / f"stats-{self.pid}.json"
        self._statistics = statistics
        self._ready = ready
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls, processes: int, statistics: Callable[[], dict[str, Any]],
                         ready: Callable[[], bool]) -> Siblings | None:
        """This process's Siblings when a parent started it as one of several, else None."""
        run_dir = os.environ.get(RUN_DIR_ENV)
        if not run_dir or processes <= 1:
            return None
        return cls(Path(run_dir), processes, statistics, ready)

    def publish(self) -> None:
        """Rewrite this process's file now, atomically."""
        data = {"pid": self.pid, "ready": self._ready(), "written": time.time(), **self._statistics()}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)
        except OSError as exc:  # the folder went away (the parent is stopping): nothing to publish to
            log.debug("Could not publish statistics to %s: %s", self.path, exc)

    def start(self) -> None:
        """Publish now, on SIGUSR1 (a sibling's GetStats) and every PUBLISH_INTERVAL_S."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.publish)
        self.publish()  # after the handler: a sibling signals only processes whose file it sees
        self._task = asyncio.ensure_future(self._every_interval())

    async def stop(self) -> None:
        """Publish the final statistics as retired: counted by the siblings from now on, never twice."""
        # A sibling's SIGUSR1 from now on is ignored: not the default action (ending the process once
        # the event loop closed), nor a publish that would bring back the live file after the rename.
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.publish()
        with contextlib.suppress(OSError):
            self.path.replace(self.run_dir / f"retired-{self.pid}.json")

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            self.publish()

    def _files(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(live siblings' latest snapshots, retired processes' last ones), this process's left out."""
        live: list[dict[str, Any]] = []
        retired: list[dict[str, Any]] = []
        for path in self.run_dir.glob("*.json"):
            kind = path.name.split("-", 1)[0]
            if kind not in ("stats", "retired") or path == self.path:
                continue
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # renamed (retired) between the listing and the read, or being replaced
            if kind == "retired":
                retired.append(data)
            elif alive(int(data["pid"])):
                live.append(data)
        return live, retired

    async def wait_all_ready(self) -> None:
        """Returns once every one of the server processes (this one included) has its model warm."""
        self.publish()
        while True:
            live, _ = self._files()
            warm = 1 + sum(bool(s.get("ready")) for s in live)
            if warm >= self.processes:
                return
            await asyncio.sleep(0.1)

    async def others(self) -> list[dict[str, Any]]:
        """The siblings' statistics, fresh (each asked to publish now, waited for at most FRESH_WAIT_S),
        and the retired processes' last ones."""
        asked = time.time()
        live, _ = self._files()
        for sibling in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(sibling["pid"]), signal.SIGUSR1)
        deadline = time.monotonic() + FRESH_WAIT_S
        while True:
            live, retired = self._files()
            if all(s["written"] >= asked for s in live) or time.monotonic() > deadline:
                return live + retired
            await asyncio.sleep(0.005)
