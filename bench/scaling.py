"""How Classify scales with the Inference service's server processes (FASHION_INFERENCE_PROCESSES) on a
machine with cores to spare: the load generator pinned to its own cores with taskset, the service
(its server processes and their workers) to the others, one process count after another.

    python -m bench.scaling                       # on 16 cores: 1, 2, 4, 8 processes at concurrency 256
    python -m bench.scaling --processes 1 2 --concurrency 64 --loadgen-cpus 0 --server-cpus 1

By default the first quarter of the cores (at least one) runs the load and the rest the service, and
the process counts are the powers of two up to the service's cores. The load generator is the C++
one (bench/native, unary Classify, one connection per 4 callers so that the kernel's SO_REUSEPORT
spreads them over the processes) when gRPC C++ is there, else one Python bench.loadgen per
load-generator core. Per process count: images/s, its ratio to one process, p50/p99, the cores the
service used and how busy the service's and the load generator's cores were (a load generator
whose cores are all busy measures itself). Writes bench/results/scaling_<timestamp>.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

from bench import native
from bench.common import REPO, cpu_seconds, loadgen_command, model_dir, start_inference, table
from bench.loadgen import load_images
from bench.run import RESULTS, WORK, machine
from tests.support import process_tree


def cpu_list(text: str) -> list[int]:
    """taskset's CPU list ("0-3,8") as CPU numbers."""
    cpus: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return sorted(set(cpus))


def cpu_text(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def busy_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU, from /proc/stat: (busy ticks, all ticks); idle and iowait are not busy."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in fields[:8]]
            out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out


def busy_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: list[int]) -> float:
    busy = sum(after[c][0] - before[c][0] for c in cpus)
    total = sum(after[c][1] - before[c][1] for c in cpus)
    return busy / total if total else 0.0


class Load:
    """The closed-loop Classify load, pinned to `cpus`: the C++ generator, else Python ones."""

    def __init__(self, cpus: list[int], channels_per: int) -> None:
        self.cpus = cpus
        self.channels_per = channels_per
        try:
            self.binary: Path | None = native.build()
            self.images = native.images_file(load_images(2000))
            self.kind = f"C++ (bench/native, one connection per {channels_per} callers)"
        except native.NativeUnavailable as exc:
            self.binary = None
            self.kind = f"Python bench.loadgen, one process per core (no C++ generator: {exc})"

    def run(self, address: str, concurrency: int, seconds: float, warmup: float) -> dict[str, float]:
        if self.binary is not None:
            return native.unary(self.binary, self.images, address, concurrency, seconds, warmup,
                                channels=max(1, concurrency // self.channels_per), cpus=cpu_text(self.cpus))
        share = [concurrency // len(self.cpus) + (i < concurrency % len(self.cpus)) for i in range(len(self.cpus))]
        procs = [subprocess.Popen(["taskset", "--cpu-list", str(cpu),
                                   *loadgen_command("classify", address, n, seconds, warmup)],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
                 for cpu, n in zip(self.cpus, share, strict=True) if n]
        results = [json.loads(p.communicate(timeout=seconds + warmup + 120)[0].strip().splitlines()[-1]) for p in procs]
        return {"images_per_s": sum(r["images_per_s"] for r in results),
                "p50_ms": max(r["p50_ms"] for r in results), "p99_ms": max(r["p99_ms"] for r in results),
                "errors": sum(r["errors"] for r in results)}


def measure(load: Load, address: str, service_pid: int, server_cpus: list[int], concurrency: int, seconds: float,
            warmup: float) -> dict[str, float]:
    """One run of the load; with the cores the service used and how busy each side's cores were while
    it was measured (from the end of the warm-up to a second before the end)."""
    result: dict[str, float] = {}
    runner = threading.Thread(target=lambda: result.update(load.run(address, concurrency, seconds, warmup)))
    runner.start()
    time.sleep(warmup + 0.5)
    pids = process_tree(service_pid)
    cpu_before, ticks_before, started = sum(map(cpu_seconds, pids)), busy_ticks(), time.monotonic()
    time.sleep(max(1.0, seconds - 1.5))
    cpu_after, ticks_after, elapsed = sum(map(cpu_seconds, pids)), busy_ticks(), time.monotonic() - started
    runner.join()
    if not result:
        raise RuntimeError("the load generator gave no result")
    return {**result, "service_cores": (cpu_after - cpu_before) / elapsed,
            "server_busy": busy_share(ticks_before, ticks_after, server_cpus),
            "loadgen_busy": busy_share(ticks_before, ticks_after, load.cpus)}


def start_pinned(work: Path, model: Path, processes: int, cpus: list[int]) -> tuple[str, int, object, str]:
    """The service with `processes` server processes (0: the service's default), every process of it
    on `cpus` (it inherits this process's affinity, set only while it starts, and sizes its processes
    from it); with the row label naming the count it runs."""
    from services.common.config import InferenceSettings
    from services.inference.cpus import server_processes

    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        service = start_inference(work / f"inference-{processes}", model, FASHION_INFERENCE_PROCESSES=str(processes))
        label = str(processes) if processes else \
            f"{server_processes(InferenceSettings(inference_processes=0))} (default)"
    finally:
        os.sched_setaffinity(0, mine)
    return service.address, service.proc.pid, service, label


def main() -> None:
    cores = sorted(os.sched_getaffinity(0))
    default_load = cores[: max(1, len(cores) // 4)]
    default_server = [c for c in cores if c not in default_load] or cores
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", help="server process counts (0: the default)",
                   default=[n for n in (1, 2, 4, 8, 16, 32) if n <= max(1, len(default_server))])
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--loadgen-cpus", default=cpu_text(default_load), help="taskset CPU list of the load generator")
    p.add_argument("--server-cpus", default=cpu_text(default_server), help="taskset CPU list of the service")
    p.add_argument("--channels-per", type=int, default=4, help="C++ load generator: callers per connection")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1, help="runs per process count (each one reported)")
    p.add_argument("--out", type=Path, help="report file (default bench/results/scaling_<timestamp>.md)")
    args = p.parse_args()
    load_cpus, server_cpus = cpu_list(args.loadgen_cpus), cpu_list(args.server_cpus)
    if set(load_cpus) & set(server_cpus):
        raise SystemExit(f"the load generator's CPUs {load_cpus} and the service's {server_cpus} overlap")

    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    work = WORK / f"scaling_{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    model, model_note = model_dir(work)
    load = Load(load_cpus, args.channels_per)
    rows: list[list[object]] = []
    one = None
    for processes in args.processes:
        print(f"{processes} processes ...", flush=True)
        address, pid, service, label = start_pinned(work, model, processes, server_cpus)
        try:
            for _ in range(args.rounds):
                r = measure(load, address, pid, server_cpus, args.concurrency, args.seconds, args.warmup)
                one = one or r["images_per_s"]
                rows.append([label, r["images_per_s"], f"{r['images_per_s'] / one:.2f}x", r["p50_ms"],
                             r["p99_ms"], int(r["errors"]), f"{r['service_cores']:.1f}",
                             f"{100 * r['server_busy']:.0f}%", f"{100 * r['loadgen_busy']:.0f}%"])
                print(rows[-1], flush=True)
        finally:
            service.terminate()  # type: ignore[attr-defined]
    report = "\n".join([
        f"# Scaling {stamp}\n",
        f"Machine: {machine()}\n",
        f"Model: {model_note}. Classify, one image per call, concurrency {args.concurrency}, closed loop, "
        f"{args.seconds:g} s after {args.warmup:g} s warm-up per run. Load generator: {load.kind}, on CPUs "
        f"{cpu_text(load_cpus)}; the service (its server processes and their worker processes) on CPUs "
        f"{cpu_text(server_cpus)} ({len(server_cpus)} cores).\n",
        table(["processes", "images/s", "x first row",
               "p50 ms", "p99 ms", "errors", "service cores used", "service CPUs busy", "load CPUs busy"], rows),
    ])
    out = args.out or RESULTS / f"scaling_{stamp}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
