"""Where the CPU of a POST /predict goes: per request, the load generator's, the gateway's, the Inference
service process's and its worker processes', with the machine's idle and stolen time, at one concurrency.
With another checkout (a `git worktree`), its services and this checkout's in alternating rounds (an A/B);
with --flask, the Flask baseline (4 sync workers, 1 ONNX Runtime thread each: its best at 64) beside them.

    python -m bench.cpu_split --concurrency 64 --rounds 3 [--tree /tmp/ab-old] [--flask]

prints one markdown row per measurement: round, side, images/s, p50 ms, then CPU (cores) and CPU per
request (ms) of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.ab_one_user import start_side, stop_all
from bench.common import REPO, cpu_seconds, model_dir
from bench.gateway import httpload_command, start_flask
from tests.support import process_tree

TICK = os.sysconf("SC_CLK_TCK")
SECONDS, WARMUP = 8.0, 2.0


def machine_times() -> list[int]:
    """/proc/stat's CPU line: user, nice, system, idle, iowait, irq, softirq, steal (ticks)."""
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def measure(url: str, concurrency: int, parts: dict[str, Callable[[], set[int]]]) -> dict[str, object]:
    """httpload against `url`; the CPU of each part (a function naming its processes) over the measured
    seconds, in cores and in ms per request."""
    load = subprocess.Popen(httpload_command(url, concurrency, SECONDS, WARMUP), cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    parts = {**parts, "load generator": lambda: {load.pid}}
    time.sleep(WARMUP + 0.5)
    pids = {name: pids_of() for name, pids_of in parts.items()}
    before = {name: {pid: cpu_seconds(pid) for pid in group} for name, group in pids.items()}
    machine_before, started = machine_times(), time.monotonic()
    time.sleep(SECONDS - 1.0)
    after = {name: {pid: cpu_seconds(pid) for pid in group} for name, group in pids.items()}
    machine_after, elapsed = machine_times(), time.monotonic() - started
    out, _ = load.communicate(timeout=120)
    result = json.loads(out.strip().splitlines()[-1])
    ticks = [b - a for a, b in zip(machine_before, machine_after, strict=True)]
    cores = {name: sum(after[name][pid] - before[name][pid] for pid in group) / elapsed
             for name, group in pids.items()}
    return {**result, "cores": cores, "idle": ticks[3] / TICK / elapsed, "steal": ticks[7] / TICK / elapsed}


def row(n: int, side: str, r: dict[str, object]) -> str:
    rate = float(r["images_per_s"])  # type: ignore[arg-type]
    cores: dict[str, float] = r["cores"]  # type: ignore[assignment]
    split = ", ".join(f"{name} {c:.2f} ({c * 1000 / max(rate, 1e-9):.3f} ms)" for name, c in cores.items())
    return (f"| {n} | {side} | {rate:,.0f} | {float(r['p50_ms']):.2f} | {split} | "  # type: ignore[arg-type]
            f"{r['idle']:.2f} / {r['steal']:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tree", type=Path, help="another checkout to measure against this one, in alternating rounds")
    p.add_argument("--flask", action="store_true", help="measure the Flask baseline (its best at 64) too")
    args = p.parse_args()
    work = REPO / "bench" / "work" / "cpu_split"
    work.mkdir(parents=True, exist_ok=True)
    model, _ = model_dir(work)
    trees = ([("other", args.tree.resolve())] if args.tree else []) + [("this", REPO)]
    targets: dict[str, tuple[str, dict[str, Callable[[], set[int]]]]] = {}
    services, servers = [], []
    try:
        for side, tree in trees:
            inference, gateway, url = start_side(tree, side, work, model)
            services.append(inference)
            servers.append(gateway)
            main_pid, gateway_pid = inference.proc.pid, gateway.pid
            targets[side] = (url, {
                "gateway": lambda pid=gateway_pid: process_tree(pid),  # type: ignore[misc]
                "inference": lambda pid=main_pid: {pid},  # type: ignore[misc]
                "workers": lambda pid=main_pid: process_tree(pid) - {pid},  # type: ignore[misc]
            })
        if args.flask:
            flask, flask_url = start_flask(model, work, "flask", workers=4, threads=1)
            servers.append(flask)
            targets["Flask"] = (flask_url, {"flask": lambda pid=flask.pid: process_tree(pid)})  # type: ignore[misc]
        print(f"concurrency {args.concurrency}; CPU in cores (ms per request)\n")
        print("| round | side | images/s | p50 ms | CPU | idle / stolen cores |\n|---|---|---|---|---|---|", flush=True)
        for n in range(1, args.rounds + 1):
            for side, (url, parts) in targets.items():
                print(row(n, side, measure(url, args.concurrency, parts)), flush=True)
    finally:
        stop_all(servers, services)


if __name__ == "__main__":
    main()
