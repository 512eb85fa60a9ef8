"""Batch pipeline benchmark: 10,000 Fashion-MNIST PNGs sorted end to end (read, classify through a
real Inference service process, record, move, fsync, CSV and log) against the in-process ceiling
(decode + preprocess + ONNX Runtime batched in one process, no I/O, as in bench/inference.py), measured
before and after the pipeline runs in this run (the better of the two counts).

Runs: the Batch service (a real process; submit, then poll GetJob), the same followed by a WatchJob
client (an event per sorted group, naming its images: what `fashion batch submit --wait` costs),
the same with batch_fsync off (what power-loss durability costs), and `fashion batch run`
(embedded, no Batch server). Each run checks that every image ended in exactly one category
folder and that the CSV has one row per image.

    python -m bench.batch_pipeline        # this section alone
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, free_port, model_dir, start_inference, table
from bench.inference import ceiling
from fashion.client import BatchClient
from fashion.client.batch import FINISHED
from services.inference import fashion_mnist
from services.inference.model import ModelManifest
from tests.support import start_service

N = 10_000
GOAL = 0.60
TRIES = 2  # each pipeline is timed twice and the better counts, as the ceiling is (a job takes ~2 s)


def write_inbox(folder: Path, pngs: list[bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(pngs):
        (folder / f"item_{i:05d}.png").write_bytes(data)


def check(workdir: Path, job_csv: str) -> None:
    """Every image sorted exactly once: N files under processed_batches, N CSV rows, none left."""
    sorted_files = [p for p in (workdir / "data" / "processed_batches").rglob("*.png")]
    left = list((workdir / "data" / "inbox").glob("*.png"))
    with open(workdir / job_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = {r["filename"] for r in rows}
    if len(sorted_files) != N or left or len(rows) != N or len(names) != N:
        raise AssertionError(f"lost or duplicated images: {len(sorted_files)} sorted, {len(left)} left in the "
                             f"inbox, {len(rows)} CSV rows ({len(names)} distinct)")


def batch_env(workdir: Path, inference: str, **extra: str) -> dict[str, str]:
    return {"FASHION_INFERENCE_ADDRESS": inference, "FASHION_BATCH_SCHEDULE": "", "FASHION_LOG_STDOUT": "false",
            "FASHION_BATCH_METRICS_PORT": "0", **extra}


def via_service(workdir: Path, pngs: list[bytes], inference: str, watch: bool = True, **extra: str
                ) -> dict[str, float]:
    """Submit, then follow the job with WatchJob (every image reported, an event per sorted group),
    or poll GetJob ten times a second."""
    write_inbox(workdir / "data" / "inbox", pngs)
    port = free_port()
    svc = start_service("services.batch", workdir, batch_env(
        workdir, inference, FASHION_BATCH_PORT=str(port), FASHION_BATCH_HOST="127.0.0.1", **extra),
        f"127.0.0.1:{port}")
    try:
        svc.wait_serving(timeout=60)
        with BatchClient(svc.address) as client:
            start = time.perf_counter()
            job = client.submit("inbox")
            if watch:
                job = client.wait(job.job_id, timeout_s=1800)
            while job.state not in FINISHED:
                time.sleep(0.1)
                job = client.get(job.job_id)
            wall = time.perf_counter() - start
    finally:
        svc.terminate()
    if job.processed != N:
        raise AssertionError(f"job {job.job_id} processed {job.processed} of {N}: {job.error}")
    check(workdir, job.results_csv)
    return {"images_per_s": N / job.duration_seconds, "wall_per_s": N / wall, "seconds": job.duration_seconds}


def embedded(workdir: Path, pngs: list[bytes], inference: str) -> dict[str, float]:
    import json

    write_inbox(workdir / "data" / "inbox", pngs)
    env = {**os.environ, **batch_env(workdir, inference)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fashion.cli", "batch", "run", "inbox", "--json"], cwd=workdir,
                         env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"fashion batch run failed ({out.returncode}): {out.stderr[-2000:]}")
    job = json.loads(out.stdout)
    check(workdir, job["results_csv"])
    return {"images_per_s": N / job["duration_seconds"], "wall_per_s": N / wall, "seconds": job["duration_seconds"]}


def run(out_dir: Path) -> str:
    work = out_dir / "batch"
    work.mkdir(parents=True, exist_ok=True)
    folder, model_label = model_dir(work)
    manifest = ModelManifest.load(folder)
    x, _ = fashion_mnist.load("test")
    pngs = [fashion_mnist.encode_png(img) for img in x[:N]]

    print("batch: in-process ceiling ...", flush=True)
    ceilings = [ceiling(manifest, N)["images_per_s"]]
    results: list[tuple[str, dict[str, float]]] = []
    inference = start_inference(work / "inference", folder)
    try:
        for label, fn in (
            ("Batch service (submit, poll GetJob)", lambda w: via_service(w, pngs, inference.address, False)),
            ("Batch service (submit, WatchJob: every image reported)",
             lambda w: via_service(w, pngs, inference.address)),
            ("Batch service, batch_fsync off (poll)", lambda w: via_service(w, pngs, inference.address, False,
                                                                             FASHION_BATCH_FSYNC="false")),
            ("`fashion batch run` (embedded)", lambda w: embedded(w, pngs, inference.address)),
        ):
            tries = []
            for attempt in range(TRIES):
                print(f"batch: {label} ({attempt + 1}/{TRIES}) ...", flush=True)
                workdir = work / f"run{len(results)}-{attempt}"
                tries.append(fn(workdir))
                shutil.rmtree(workdir / "data")  # 10,000 images; the CSV, summary and logs stay
            best_try = max(tries, key=lambda r: r["images_per_s"])
            results.append((label, {**best_try, "tries": [r["images_per_s"] for r in tries]}))
    finally:
        inference.terminate()
    print("batch: in-process ceiling again ...", flush=True)
    ceilings.append(ceiling(manifest, N)["images_per_s"])
    ceil = max(ceilings)  # the better of the two (before and after): the ratio errs against us on a busy machine

    rows: list[list[object]] = [[f"in-process ceiling (decode + preprocess + ONNX, no I/O; best of "
                                 f"{', '.join(f'{c:,.0f}' for c in ceilings)})", ceil, "", "100%"]]
    rows += [[f"{label}; best of {', '.join(f'{t:,.0f}' for t in r['tries'])}", r["images_per_s"], r["wall_per_s"],
              f"{100 * r['images_per_s'] / ceil:.0f}%"] for label, r in results]
    best = results[0][1]["images_per_s"] / ceil
    watched = results[1][1]["images_per_s"] / ceil
    return "\n".join([
        "## Batch pipeline\n",
        f"Model: {manifest.name} v{manifest.version} ({model_label}). {N:,} Fashion-MNIST PNGs in one folder, "
        "sorted end to end: read, ClassifyBatch through a real Inference service process (default settings), "
        "write-ahead record, move, fsync, CSV and per-image log; every run checked for lost or duplicated "
        "images. Job rate = images / job duration (the better of two jobs, as the ceiling is the better of "
        "two measurements); wall rate includes submitting, process start (embedded) and waiting.\n",
        table(["pipeline", "job images/s", "wall images/s", "of ceiling"], rows),
        "",
        f"Goal: the Batch service at ≥ {100 * GOAL:.0f}% of the in-process ceiling: **{100 * best:.0f}%** "
        f"({'met' if best >= GOAL else 'not met'}); {100 * watched:.0f}% while a WatchJob client follows "
        "every image.\n",
    ])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    stamp = time.strftime("%Y%m%d_%H%M%S")
    target = REPO / "bench" / "work" / f"batch_{stamp}"
    print(run(target))
