"""Each peer at its best, a head-to-head against those bests in rounds, and the scaling of
FASHION_INFERENCE_PROCESSES on this machine.

1. MLServer 1.7.1 tuned as its users would: every combination of ONNX Runtime intra-op threads
   (1, 2), spinning (on, off), adaptive batching's max_batch_size (32, 64) and parallel_workers
   (1, 2), KServe ModelInfer at concurrency 16 and 64. Its best is the highest geometric mean of
   the two.
2. The Flask + gunicorn baseline (bench.flask_baseline) with 2, 3 and 4 sync workers, ONNX
   Runtime's default threads or one per worker, at concurrency 1, 16 and 64. Its best at 1 is the
   lowest p50, at 64 the most images/s.
3. ROUNDS rounds, each measuring ours and the peers' bests alternately: ModelInfer (FP32 [0, 1]
   and UINT8) against MLServer at 16 and 64, and the gateway's POST /predict against Flask at 1 and
   64. The ratios are taken within each round, so the machine's drift between rounds cancels.
4. Scaling: the Inference service with 1 and 2 server processes, Classify and ModelInfer UINT8 at
   1, 16 and 64.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import mlserver_peer
from bench.common import free_port, loadgen, model_dir, start_inference, table
from bench.gateway import httpload, start_flask, start_gateway, stop
from services.inference.model import ModelManifest

ROUNDS = 3
SCREEN_S, SCREEN_WARMUP_S = 4.0, 1.5  # each configuration of the search
ROUND_S, ROUND_WARMUP_S = 6.0, 2.0  # each measurement of a round
MLSERVER_TUNINGS = [mlserver_peer.Tuning(threads, spinning, batch, workers) for threads, spinning, batch, workers
                    in itertools.product((1, 2), (True, False), (32, 64), (1, 2))]
FLASK_WORKERS = (2, 3, 4)
FLASK_THREADS = (0, 1)  # 0: ONNX Runtime's default (a thread per core in each worker)
MODEL_INFER_GOAL, REST_GOAL = 2.0, 3.0


@dataclass(frozen=True)
class FlaskTuning:
    workers: int
    threads: int

    def label(self) -> str:
        threads = "default ONNX Runtime threads" if self.threads == 0 else f"{self.threads} ONNX Runtime thread"
        return f"{self.workers} sync workers, {threads}"


class Servers:
    """The servers of one measurement: started on free ports, all stopped by `close`."""

    def __init__(self, work: Path, model: Path, manifest: ModelManifest) -> None:
        self.work = work
        self.model = model
        self.manifest = manifest
        self.running: list[Any] = []

    def mlserver(self, tuning: mlserver_peer.Tuning, name: str) -> str:
        port = free_port()
        peer = mlserver_peer.start(self.model / self.manifest.file, self.work / name, self.manifest.name,
                                   self.manifest.input_name, self.manifest.output_name, port, free_port(),
                                   free_port(), tuning)
        self.running.append(peer)
        address = f"127.0.0.1:{port}"
        mlserver_peer.wait_ready(address, self.manifest.name)
        return address

    def flask(self, tuning: FlaskTuning, name: str) -> str:
        proc, url = start_flask(self.model, self.work, name, tuning.workers, tuning.threads)
        self.running.append(proc)
        return url

    def inference(self, name: str, processes: int = 1) -> str:
        svc = start_inference(self.work / name, self.model, FASHION_INFERENCE_PROCESSES=str(processes))
        self.running.append(svc)
        return svc.address

    def gateway(self, inference_address: str, name: str) -> str:
        proc, url = start_gateway(inference_address, self.work, name)
        self.running.append(proc)
        return url

    def close(self) -> None:
        for server in reversed(self.running):
            if hasattr(server, "terminate") and not hasattr(server, "send_signal"):
                server.terminate()  # a tests.support.ServiceProcess
            else:
                stop(server)
        self.running = []


def model_infer(address: str, concurrency: int, form: str, model: Path, name: str, seconds: float,
                warmup: float) -> dict[str, float]:
    return loadgen("modelinfer", address, concurrency, seconds, warmup, model=name, model_dir=model, form=form)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values))


def search_mlserver(work: Path, model: Path,
                    manifest: ModelManifest) -> tuple[mlserver_peer.Tuning, list[list[object]]]:
    rows: list[list[object]] = []
    best: tuple[float, mlserver_peer.Tuning] | None = None
    for k, tuning in enumerate(MLSERVER_TUNINGS):
        servers = Servers(work, model, manifest)
        try:
            address = servers.mlserver(tuning, f"mlserver-{k}")
            print(f"MLServer {tuning.label()} ...", flush=True)
            r = {c: model_infer(address, c, "normalized", model, manifest.name, SCREEN_S, SCREEN_WARMUP_S)
                 for c in (16, 64)}
        finally:
            servers.close()
        score = geometric_mean([r[16]["images_per_s"], r[64]["images_per_s"]])
        rows.append([tuning.label(), r[16]["images_per_s"], r[16]["p99_ms"], r[64]["images_per_s"],
                     r[64]["p99_ms"], int(r[16]["errors"] + r[64]["errors"])])
        if (r[16]["errors"] + r[64]["errors"]) == 0 and (best is None or score > best[0]):
            best = (score, tuning)
    if best is None:
        raise RuntimeError("every MLServer configuration had errors")
    return best[1], rows


def search_flask(work: Path, model: Path,
                 manifest: ModelManifest) -> tuple[FlaskTuning, FlaskTuning, list[list[object]]]:
    rows: list[list[object]] = []
    results: dict[FlaskTuning, dict[int, dict[str, float]]] = {}
    for workers, threads in itertools.product(FLASK_WORKERS, FLASK_THREADS):
        tuning = FlaskTuning(workers, threads)
        servers = Servers(work, model, manifest)
        try:
            url = servers.flask(tuning, f"flask-{workers}-{threads}")
            print(f"Flask {tuning.label()} ...", flush=True)
            results[tuning] = {c: httpload(url, c, SCREEN_S, SCREEN_WARMUP_S) for c in (1, 16, 64)}
        finally:
            servers.close()
        r = results[tuning]
        rows.append([tuning.label(), r[1]["p50_ms"], r[1]["images_per_s"], r[16]["images_per_s"],
                     r[64]["images_per_s"], int(sum(x["errors"] for x in r.values()))])
    fastest_alone = min(results, key=lambda t: results[t][1]["p50_ms"])
    most_at_64 = max(results, key=lambda t: results[t][64]["images_per_s"])
    return fastest_alone, most_at_64, rows


def head_to_head(work: Path, model: Path, manifest: ModelManifest, mlserver: mlserver_peer.Tuning,
                 flask_alone: FlaskTuning, flask_64: FlaskTuning) -> list[dict[str, dict[int, dict[str, float]]]]:
    rounds: list[dict[str, dict[int, dict[str, float]]]] = []
    servers = Servers(work, model, manifest)
    try:
        ours = servers.inference("inference")
        gateway = servers.gateway(ours, "gateway")
        peer = servers.mlserver(mlserver, "mlserver-best")
        flask_urls = {1: servers.flask(flask_alone, "flask-best-1")}
        flask_urls[64] = flask_urls[1] if flask_64 == flask_alone else servers.flask(flask_64, "flask-best-64")
        for n in range(ROUNDS):
            result: dict[str, dict[int, dict[str, float]]] = {key: {} for key in
                                                              ("fp32", "uint8", "mlserver", "gateway", "flask")}
            for c in (16, 64):
                print(f"round {n + 1}: ModelInfer c={c} ...", flush=True)
                result["fp32"][c] = model_infer(ours, c, "fp32", model, manifest.name, ROUND_S, ROUND_WARMUP_S)
                result["mlserver"][c] = model_infer(peer, c, "normalized", model, manifest.name, ROUND_S,
                                                    ROUND_WARMUP_S)
                result["uint8"][c] = model_infer(ours, c, "uint8", model, manifest.name, ROUND_S, ROUND_WARMUP_S)
            for c in (1, 64):
                print(f"round {n + 1}: POST /predict c={c} ...", flush=True)
                result["gateway"][c] = httpload(gateway, c, ROUND_S, ROUND_WARMUP_S)
                result["flask"][c] = httpload(flask_urls[c], c, ROUND_S, ROUND_WARMUP_S)
            rounds.append(result)
    finally:
        servers.close()
    return rounds


def scaling(work: Path, model: Path, manifest: ModelManifest) -> dict[int, dict[str, dict[int, dict[str, float]]]]:
    results: dict[int, dict[str, dict[int, dict[str, float]]]] = {}
    for processes in (1, 2):
        servers = Servers(work, model, manifest)
        try:
            address = servers.inference(f"inference-{processes}-processes", processes)
            results[processes] = {"classify": {}, "uint8": {}}
            for c in (1, 16, 64):
                print(f"{processes} processes, c={c} ...", flush=True)
                results[processes]["classify"][c] = loadgen("classify", address, c, ROUND_S, ROUND_WARMUP_S)
                results[processes]["uint8"][c] = model_infer(address, c, "uint8", model, manifest.name, ROUND_S,
                                                             ROUND_WARMUP_S)
        finally:
            servers.close()
    return results


def run(out_dir: Path) -> str:
    work = out_dir / "peers"
    work.mkdir(parents=True, exist_ok=True)
    model, model_note = model_dir(work)
    manifest = ModelManifest.load(model)
    mlserver_best, mlserver_rows = search_mlserver(work, model, manifest)
    flask_alone, flask_64, flask_rows = search_flask(work, model, manifest)
    rounds = head_to_head(work, model, manifest, mlserver_best, flask_alone, flask_64)
    scaled = scaling(work, model, manifest)
    (out_dir / "peers.json").write_text(json.dumps({
        "mlserver_best": mlserver_best.label(), "flask_best_alone": flask_alone.label(),
        "flask_best_64": flask_64.label(), "rounds": rounds, "scaling": scaled}, indent=2))

    lines = ["## Peers at their best\n",
             f"Model: {model_note}. One image per request, closed loop, load generators in their own processes. "
             f"Search: {SCREEN_S:g} s after {SCREEN_WARMUP_S:g} s warm-up per measurement; rounds and scaling: "
             f"{ROUND_S:g} s after {ROUND_WARMUP_S:g} s.\n",
             "### MLServer 1.7.1, every tuning (ModelInfer, normalized FP32)\n",
             table(["tuning", "c=16 images/s", "c=16 p99 ms", "c=64 images/s", "c=64 p99 ms", "errors"],
                   mlserver_rows),
             f"\nBest (geometric mean of 16 and 64): **{mlserver_best.label()}**.\n",
             "### Flask + gunicorn baseline, every tuning (POST /predict)\n",
             table(["tuning", "c=1 p50 ms", "c=1 images/s", "c=16 images/s", "c=64 images/s", "errors"], flask_rows),
             f"\nBest at concurrency 1 (p50): **{flask_alone.label()}**; at 64 (images/s): **{flask_64.label()}**.\n",
             f"### Head-to-head against those bests, {ROUNDS} rounds\n"]
    rows: list[list[object]] = []
    names = {"fp32": "fashion ModelInfer FP32 [0, 1]", "uint8": "fashion ModelInfer UINT8",
             "mlserver": "MLServer (best tuning) ModelInfer", "gateway": "fashion gateway POST /predict",
             "flask": "Flask (best tuning) POST /predict"}
    for n, result in enumerate(rounds, 1):
        for key, by_c in result.items():
            for c, r in by_c.items():
                rows.append([n, names[key], c, r["images_per_s"], r["p50_ms"], r["p99_ms"], int(r["errors"])])
    lines.append(table(["round", "target", "concurrency", "images/s", "p50 ms", "p99 ms", "errors"], rows))
    ratio_rows: list[list[object]] = []
    goals: dict[str, bool] = {}

    def check(goal: str, met: bool) -> None:  # a goal is met when it is met in every round
        goals[goal] = goals.get(goal, True) and met

    for n, result in enumerate(rounds, 1):
        row: list[object] = [n]
        for form in ("fp32", "uint8"):
            for c in (16, 64):
                ratio = result[form][c]["images_per_s"] / max(result["mlserver"][c]["images_per_s"], 1e-9)
                check(f"ModelInfer {form.upper()} ≥ {MODEL_INFER_GOAL:g}x MLServer at {c}", ratio >= MODEL_INFER_GOAL)
                row.append(f"{ratio:.2f}x")
        p50, flask_p50 = result["gateway"][1]["p50_ms"], result["flask"][1]["p50_ms"]
        at_64 = result["gateway"][64]["images_per_s"] / max(result["flask"][64]["images_per_s"], 1e-9)
        check("REST p50 at 1 ≤ Flask's", p50 <= flask_p50)
        check(f"REST at 64 ≥ {REST_GOAL:g}x Flask", at_64 >= REST_GOAL)
        row += [f"{p50:.2f} / {flask_p50:.2f} ms", f"{at_64:.2f}x"]
        ratio_rows.append(row)
    lines += ["\nRatios within each round:\n",
              table(["round", "FP32 c=16", "FP32 c=64", "UINT8 c=16", "UINT8 c=64",
                     "REST p50 c=1 (ours / Flask)", "REST c=64"], ratio_rows),
              "\nGoals, in every round:\n"]
    lines += [f"- {goal}: {'met' if met else 'NOT met'}" for goal, met in goals.items()]
    scale_rows = [[p, mode, c, r["images_per_s"], r["p50_ms"], r["p99_ms"], int(r["errors"])]
                  for p, by_mode in scaled.items() for mode, by_c in by_mode.items() for c, r in by_c.items()]
    slower = [f"{mode} c={c}" for mode in ("classify", "uint8") for c in (1, 16, 64)
              if scaled[2][mode][c]["images_per_s"] < scaled[1][mode][c]["images_per_s"]]
    lines += ["\n### FASHION_INFERENCE_PROCESSES on this machine\n",
              table(["processes", "method", "concurrency", "images/s", "p50 ms", "p99 ms", "errors"], scale_rows),
              "\n2 processes slower than 1: " + (", ".join(slower) if slower else "nowhere") + ".\n"]
    return "\n".join(lines) + "\n"
