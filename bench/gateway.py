"""The REST gateway: POST /predict at concurrency 1, 16 and 64 beside a direct gRPC Classify on the
same Inference service, and beside the monitoring guide's design (a plain Flask app under gunicorn with 2
sync workers, the same model and preprocessing per request), all measured in the same run.
Every load generator runs in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import REPO, free_port, loadgen, model_dir, start_inference, table

CONCURRENCY = (1, 16, 64)
SECONDS, WARMUP = 8.0, 2.0
GOAL = 3.0  # the gateway at least 3x the Flask baseline at concurrency 64


def httpload_command(url: str, concurrency: int, seconds: float = SECONDS, warmup: float = WARMUP) -> list[str]:
    """The command line of one bench.httpload run (POST /predict at `url`)."""
    return [sys.executable, "-m", "bench.httpload", "--url", url, "--concurrency", str(concurrency),
            "--seconds", str(seconds), "--warmup", str(warmup)]


def httpload(url: str, concurrency: int, seconds: float = SECONDS, warmup: float = WARMUP) -> dict[str, float]:
    out = subprocess.run(httpload_command(url, concurrency, seconds, warmup), capture_output=True, text=True,
                         cwd=REPO, timeout=seconds + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"httpload failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not answering after {timeout}s")


def start(args: list[str], work: Path, name: str, env: dict[str, str],
          cwd: Path = REPO) -> tuple[subprocess.Popen[bytes], Path]:
    """`args` started in `cwd` (where `python -m` finds the code it runs), output to work/<name>.out."""
    log = work / f"{name}.out"
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def start_gateway(inference_address: str, work: Path, name: str, cwd: Path = REPO,
                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway (the code of `cwd`) in front of the Inference service at `inference_address`, answering:
    the process and its POST /predict URL."""
    port = free_port()
    proc, log = start([sys.executable, "-m", "services.gateway"], work, name, {
        **(env or {}), "FASHION_GATEWAY_HOST": "127.0.0.1", "FASHION_GATEWAY_PORT": str(port),
        "FASHION_INFERENCE_ADDRESS": inference_address, "FASHION_LOG_STDOUT": "false",
        "FASHION_LOG_DIR": str(work / f"{name}-logs")}, cwd)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}/predict"


def start_flask(model: Path, work: Path, name: str, workers: int = 2,
                threads: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """The Flask baseline (bench.flask_baseline) under gunicorn with `workers` sync workers and `threads` ONNX
    Runtime threads each (0: its default), answering: the process and its POST /predict URL."""
    port = free_port()
    proc, log = start([sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
                       "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "bench.flask_baseline:create_app()"],
                      work, name, {"FLASK_BASELINE_MODEL_DIR": str(model), "FLASK_BASELINE_THREADS": str(threads),
                                   "FLASK_BASELINE_LOG_DIR": str(work / f"{name}-logs")})
    url = f"http://127.0.0.1:{port}/predict"
    try:
        wait_http(url, proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(out_dir: Path) -> str:
    work = out_dir / "gateway-work"
    work.mkdir(parents=True, exist_ok=True)
    model, model_note = model_dir(work)
    if os.environ.get("FASHION_BENCH_MODEL_DIR"):  # e.g. a candidate model before one is shipped
        model = Path(os.environ["FASHION_BENCH_MODEL_DIR"])
        model_note = f"{model} (FASHION_BENCH_MODEL_DIR)"
    results: dict[str, dict[int, dict[str, float]]] = {"gateway": {}, "grpc": {}, "flask": {}, "flask_tuned": {}}

    inference = start_inference(work / "inference", model)
    try:
        gateway, predict_url = start_gateway(inference.address, work, "gateway")
    except BaseException:
        inference.terminate()
        raise
    try:
        for c in CONCURRENCY:
            print(f"gateway POST /predict, concurrency {c}", flush=True)
            results["gateway"][c] = httpload(predict_url, c)
            print(f"gRPC Classify, concurrency {c}", flush=True)
            results["grpc"][c] = loadgen("classify", inference.address, c, SECONDS, WARMUP)
    finally:
        stop(gateway)
        inference.terminate()

    for key, threads, levels in (("flask", 0, CONCURRENCY), ("flask_tuned", 1, (64,))):
        flask, flask_url = start_flask(model, work, key, threads=threads)
        try:
            for c in levels:
                print(f"{key}: Flask + gunicorn (2 sync workers), concurrency {c}", flush=True)
                results[key][c] = httpload(flask_url, c)
        finally:
            stop(flask)

    (out_dir / "gateway.json").write_text(json.dumps(results, indent=2))
    names = {"gateway": "gateway POST /predict (HTTP multipart)", "grpc": "direct gRPC Classify",
             "flask": "Flask + gunicorn, 2 sync workers (monitoring guide's design)",
             "flask_tuned": "same, tuned: 1 ONNX Runtime thread per worker"}
    rows = [[names[k], c, r["images_per_s"], r["p50_ms"], r["p99_ms"], int(r["errors"])]
            for k, by_c in results.items() for c, r in by_c.items()]
    ratio = results["gateway"][64]["images_per_s"] / max(results["flask"][64]["images_per_s"], 1e-9)
    tuned = results["gateway"][64]["images_per_s"] / max(results["flask_tuned"][64]["images_per_s"], 1e-9)
    verdict = "met" if ratio >= GOAL else "NOT met"
    return "\n".join([
        "## Gateway\n",
        f"Model: {model_note}. One image (Fashion-MNIST PNG) per request, closed loop, {SECONDS:g} s after "
        f"{WARMUP:g} s warm-up; load generators in their own processes on the same machine.\n",
        table(["target", "concurrency", "images/s", "p50 ms", "p99 ms", "errors"], rows),
        f"\nGateway vs Flask baseline at concurrency 64: **{ratio:.1f}x** (goal {GOAL:g}x: {verdict}); "
        f"vs the tuned Flask: {tuned:.1f}x.\n",
    ])
