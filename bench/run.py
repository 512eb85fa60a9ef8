"""`make bench`: every benchmark section, one markdown report in bench/results/.

Sections are modules with `run(out_dir: Path) -> str`; each measures its own baselines in the
same run, so the ratios it reports compare like with like on this (noisy) machine.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import subprocess
import time
import traceback
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # reports (committed)
WORK = Path(__file__).resolve().parent / "work"  # models, logs, server output of each run (ignored)
SECTIONS = {
    "inference": "bench.inference",
    "batch": "bench.batch_pipeline",
    "gateway": "bench.gateway",
    "peers": "bench.peers",
    "cli": "bench.cli",
}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"{platform.node()}: {cpu}, {len(__import__('os').sched_getaffinity(0))} cores, "
            f"Python {platform.python_version()}, load average {' '.join(load)}, commit {commit or '?'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    args = parser.parse_args()
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    out_dir = WORK / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = [f"# Benchmark {stamp}\n", f"Machine: {machine()}\n"]
    for name in args.only or list(SECTIONS):
        try:
            module = importlib.import_module(SECTIONS[name])
        except ModuleNotFoundError as exc:
            parts.append(f"## {name}\n\nnot run: {exc}\n")
            continue
        print(f"== {name} ==", flush=True)
        started = time.monotonic()
        try:
            parts.append(module.run(out_dir))
        except Exception:
            parts.append(f"## {name}\n\nFAILED:\n\n```\n{traceback.format_exc()}```\n")
        print(f"== {name}: {time.monotonic() - started:.0f}s ==", flush=True)
    report = "\n".join(parts)
    (RESULTS / f"bench_{stamp}.md").write_text(report)
    (RESULTS / "latest.md").write_text(report)
    print(report)
    print(f"written to {RESULTS / f'bench_{stamp}.md'} and {RESULTS / 'latest.md'}; work files in {out_dir}")


if __name__ == "__main__":
    main()
