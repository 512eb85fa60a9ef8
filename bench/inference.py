"""Inference benchmarks: the in-process ceiling, photo preprocessing, the service over gRPC for
each method at concurrency 1, 16 and 64, MLServer 1.7.1 on the same model.onnx, and the bound that
gRPC's own per-message cost puts on ClassifyStream (bench.echo)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import mlserver_peer, native
from bench.common import REPO, free_port, loadgen, model_dir, start_inference, table
from bench.loadgen import load_images
from services.inference import fashion_mnist
from services.inference.engine import OnnxModel
from services.inference.imaging import Preprocessor
from services.inference.model import ModelManifest

CONCURRENCY = (1, 16, 64)
BATCH = 64
# KServe ModelInfer, one image a request, in each input form our service declares (bench.loadgen --form):
# FP32 pixels / 255 (the service normalizes, as the peer's client does for it), UINT8 pixels, PNG files.
MODEL_INFER = (("modelinfer", "ModelInfer FP32 [0, 1] (tritonclient)"),
               ("modelinfer-uint8", "ModelInfer UINT8 (tritonclient)"),
               ("modelinfer-png", "ModelInfer BYTES PNG (tritonclient)"))


def ceiling(manifest: ModelManifest, n: int = 10_000) -> dict[str, float]:
    """Decode + preprocess + ONNX Runtime (2 threads, batches of 64), one process: images/s."""
    x, _ = fashion_mnist.load("test")
    pngs = [fashion_mnist.encode_png(img) for img in x[:n]]
    pre = Preprocessor.from_manifest(manifest)
    model = OnnxModel(manifest, "cpu", intra_op_threads=2)
    model.run(np.stack([pre(p) for p in pngs[:BATCH]]))  # warm-up
    decode_s = infer_s = 0.0
    for i in range(0, n, BATCH):
        t0 = time.perf_counter()
        batch = np.stack([pre(p) for p in pngs[i: i + BATCH]])
        t1 = time.perf_counter()
        model.run(batch)
        t2 = time.perf_counter()
        decode_s += t1 - t0
        infer_s += t2 - t1
    return {"images_per_s": n / (decode_s + infer_s), "decode_per_s": n / decode_s, "model_per_s": n / infer_s}


def photo_preprocessing(manifest: ModelManifest, n: int = 400, n_accuracy: int = 3000) -> dict[str, float]:
    """Our JPEG path (reduced-scale decode, crop, fit) against a plain full decode and resize
    (timed on `n` photos), and whether the reduced-scale decode costs accuracy (same model, the
    same `n_accuracy` photos: enough that one image is 0.03 points)."""
    x, y = fashion_mnist.load("test")
    rng = np.random.default_rng(123)
    photos = [fashion_mnist.render_product_photo(img, rng) for img in x[:n_accuracy]]
    ours = Preprocessor.from_manifest(manifest)
    full = Preprocessor.from_manifest(manifest, use_draft=False)
    side = (manifest.width, manifest.height)

    def plain(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("L").resize(side), np.float32)

    def per_image_us(fn, timed: list[bytes]) -> float:  # type: ignore[no-untyped-def]
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for p in timed:
                fn(p)
            best = min(best, (time.perf_counter() - t) / len(timed) * 1e6)
        return best

    sizes = [Image.open(io.BytesIO(p)).size for p in photos]
    model = OnnxModel(manifest, "cpu", intra_op_threads=2)
    acc_draft = float((model.run(np.stack([ours(p) for p in photos])).argmax(1) == y[:n_accuracy]).mean())
    acc_full = float((model.run(np.stack([full(p) for p in photos])).argmax(1) == y[:n_accuracy]).mean())
    timed = photos[:n]
    return {
        "ours_us": per_image_us(ours, timed), "full_decode_ours_us": per_image_us(full, timed),
        "plain_us": per_image_us(plain, timed), "mean_side": float(np.mean(sizes)), "n": n,
        "n_accuracy": n_accuracy, "acc_draft": acc_draft, "acc_full": acc_full,
    }


def run(out_dir: Path) -> str:
    work = out_dir / "inference"
    work.mkdir(parents=True, exist_ok=True)
    folder, model_label = model_dir(work)
    manifest = ModelManifest.load(folder)
    lines = [f"## Inference\n\nModel: {manifest.name} v{manifest.version} ({model_label}).\n"]

    print("in-process ceiling ...", flush=True)
    ceil = ceiling(manifest)
    lines.append(
        "In-process ceiling (10,000 Fashion-MNIST PNGs, decode + preprocess in one thread, ONNX Runtime "
        f"2 threads, batches of {BATCH}): **{ceil['images_per_s']:,.0f} images/s** "
        f"(decode+preprocess alone {ceil['decode_per_s']:,.0f}/s, model alone {ceil['model_per_s']:,.0f}/s).\n")

    print("photo preprocessing ...", flush=True)
    ph = photo_preprocessing(manifest)
    lines.append(
        f"Product-photo preprocessing ({ph['n']} JPEG photos, mean side {ph['mean_side']:.0f} px): ours "
        f"{ph['ours_us']:.0f} µs/image, plain full decode + resize {ph['plain_us']:.0f} µs/image "
        f"(**{ph['plain_us'] / ph['ours_us']:.1f}x faster**); our pipeline without reduced-scale decoding "
        f"{ph['full_decode_ours_us']:.0f} µs. Top-1 on {ph['n_accuracy']:,} such photos: "
        f"{100 * ph['acc_draft']:.2f}% with reduced-scale decoding, {100 * ph['acc_full']:.2f}% with full decoding.\n")

    rows: list[list[object]] = []
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        load_binary: Path | None = native.build()
        stream_images = native.images_file(load_images(2000))
        native_note = ""
    except native.NativeUnavailable as exc:
        load_binary, native_note = None, f"not run: {exc}"
    svc = start_inference(work / "service", folder)
    try:
        for mode, label in (("classify", "Classify"), ("batch", f"ClassifyBatch ({BATCH}/request)"),
                            ("stream", "ClassifyStream"), *MODEL_INFER):
            for c in CONCURRENCY:
                print(f"ours {mode} c={c} ...", flush=True)
                extra: dict[str, object] = {}
                if mode.startswith("modelinfer"):
                    extra = {"model": manifest.name, "model_dir": folder, "form": mode.partition("-")[2] or "fp32"}
                r = loadgen(mode.partition("-")[0], svc.address, c, batch=BATCH, **extra)
                results[(mode, c)] = r
                rows.append([f"fashion {label}", c, r["images_per_s"], r["p50_ms"], r["p99_ms"], r["errors"]])
        for c in CONCURRENCY if load_binary else ():
            print(f"ours stream (C++ client) c={c} ...", flush=True)
            r = native.stream(load_binary, stream_images, svc.address, c)
            results[("native", c)] = r
            rows.append(["fashion ClassifyStream, C++ load generator", c, r["images_per_s"], r["p50_ms"],
                         r["p99_ms"], r["errors"]])
    finally:
        svc.terminate()

    grpc_port = free_port()
    peer = mlserver_peer.start(folder / manifest.file, work / "mlserver", manifest.name, manifest.input_name,
                               manifest.output_name, grpc_port, free_port(), free_port())
    try:
        mlserver_peer.wait_ready(f"127.0.0.1:{grpc_port}", manifest.name)
        for c in CONCURRENCY:
            print(f"mlserver c={c} ...", flush=True)
            r = loadgen("modelinfer", f"127.0.0.1:{grpc_port}", c, model=manifest.name, model_dir=folder,
                        form="normalized")
            results[("mlserver", c)] = r
            rows.append(["MLServer 1.7.1 ModelInfer FP32 normalized (tritonclient)", c, r["images_per_s"], r["p50_ms"],
                         r["p99_ms"], r["errors"]])
    finally:
        peer.terminate()
        peer.wait(30)

    print("transport bound (echo stream) ...", flush=True)
    echo = json.loads(subprocess.run([sys.executable, "-m", "bench.echo"], capture_output=True, text=True,
                                     cwd=REPO, timeout=120, check=True).stdout.strip().splitlines()[-1])
    echo_rate = echo["messages_per_s"]
    stream_bound = 1 / (1 / echo_rate + 1 / ceil["images_per_s"])

    lines.append(table(["server / method", "concurrency", "images/s", "p50 ms", "p99 ms", "errors"], rows))
    lines.append("\nClassifyStream is driven twice: by bench.loadgen (Python, grpc.aio) and by bench/native "
                 "(C++, the same closed loop: streams x 64 messages in flight, one image per message), because "
                 "the load generator shares these 2 cores with the service and the Python one costs about "
                 "100 µs of CPU a message, the C++ one about a third of that.")
    lines.append(f"\nTransport bound on ClassifyStream under the Python load: a bare grpc.aio echo stream under "
                 f"the same load (bench.echo) carries {echo_rate:,.0f} messages/s here; with the in-process work "
                 f"on the same cores a one-image-per-message stream can reach about {stream_bound:,.0f} images/s "
                 f"({100 * stream_bound / ceil['images_per_s']:.0f}% of the ceiling).")
    lines.append("\nGoals (ratios measured in this run):\n")
    for mode in ("classify", "modelinfer"):
        for c in (16, 64):
            ours, peer_r = results[(mode, c)], results[("mlserver", c)]
            ratio = ours["images_per_s"] / peer_r["images_per_s"]
            lines.append(f"- {mode} c={c}: {ratio:.2f}x MLServer's throughput (goal ≥ 2x), p99 "
                         f"{ours['p99_ms']:.1f} ms vs {peer_r['p99_ms']:.1f} ms (goal: lower)")
    lines.append(f"- Classify p50 at c=1: {results[('classify', 1)]['p50_ms']:.2f} ms (goal < 1.5 ms)")
    for mode, label in (("batch", "batch"), ("stream", "stream, Python load generator"),
                        ("native", "stream, C++ load generator")):
        if mode == "native" and not load_binary:
            lines.append(f"- {label}: {native_note}")
            continue
        best = max(results[(mode, c)]["images_per_s"] for c in CONCURRENCY)
        bound = f"; transport bound {100 * stream_bound / ceil['images_per_s']:.0f}%" if mode == "stream" else ""
        lines.append(f"- {label}: best {best:,.0f} images/s = {100 * best / ceil['images_per_s']:.0f}% of the "
                     f"in-process ceiling (goal ≥ 70%){bound}")
    lines.append(f"- photo preprocessing: {ph['plain_us'] / ph['ours_us']:.1f}x faster than a plain full decode "
                 "(goal ≥ 3x)")
    return "\n".join(lines) + "\n"
