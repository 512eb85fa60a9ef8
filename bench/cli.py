"""CLI start-up: how long `fashion --help` takes, and importing the client library, each in a fresh
interpreter (median of 15), against the issue's goal of 150 ms for `fashion --help`.

    python -m bench.cli        # this section alone
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import table

RUNS = 15
GOAL_S = 0.150
FASHION = str(Path(sys.executable).with_name("fashion"))


def _median_s(command: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd="/")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(out_dir: Path) -> str:
    commands = {"python -c pass (the interpreter alone)": [sys.executable, "-c", "pass"],
                "fashion --help": [FASHION, "--help"],
                "python -c 'import fashion.client'": [sys.executable, "-c", "import fashion.client"]}
    medians = {name: _median_s(command) for name, command in commands.items()}
    rows = [[name, f"{1000 * median:.0f} ms"] for name, median in medians.items()]
    helped = medians["fashion --help"]
    verdict = "met" if helped <= GOAL_S else "NOT met"
    return (table(["command", f"median of {RUNS}"], rows)
            + f"\n\n`fashion --help` {1000 * helped:.0f} ms: goal ≤ {1000 * GOAL_S:.0f} ms {verdict}.\n")


if __name__ == "__main__":
    print(run(Path("bench/work")))
