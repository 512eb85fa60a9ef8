"""The CUDA path, checked on a machine with an NVIDIA GPU and onnxruntime-gpu (`make install-gpu`):

    python -m bench.gpu_check            # prints a JSON report; exit status 1 when a check fails
    python -m bench.gpu_check --provider cpu   # the same run on the CPU (tries the script anywhere)

1. ONNX Runtime offers CUDAExecutionProvider, and the engine's `auto` preference puts it first.
2. The shipped model on CUDA (OnnxModel, execution_provider=cuda, which runs the manifest's
   gpu_file, the float model) gives the CPU's probabilities for that same file on the Fashion-MNIST
   test set (largest difference, top-1 agreement), and the accuracy of each, with the CPU's default
   (quantized) file beside them.
3. The model alone, batches of 256: images/s on the GPU (gpu_file) and on the CPU (default file).
4. The Inference service started with FASHION_EXECUTION_PROVIDER=cuda on a real port: SERVING,
   GetModelInfo names CUDAExecutionProvider, Classify and ClassifyBatch on real PNGs give the
   dataset's labels (accuracy reported), and Classify at concurrency 16 (images/s).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np

from services.common.config import SHIPPED_MODEL_DIR
from services.inference import engine, fashion_mnist
from services.inference.engine import OnnxModel
from services.inference.imaging import Preprocessor
from services.inference.model import ModelManifest

N = 10_000


def model_alone(model: OnnxModel, x: np.ndarray, batch: int = 256, seconds: float = 3.0) -> float:
    model.run(x[:batch])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(x) - batch + 1, batch):
            model.run(x[i: i + batch])
            done += batch
    return done / (time.perf_counter() - start)


def service_checks(manifest: ModelManifest, pngs: list[bytes], labels: np.ndarray,
                   provider: str) -> dict[str, object]:
    from fashion.v1 import inference_pb2 as pb
    from fashion.v1 import inference_pb2_grpc as pb_grpc
    from tests.support import free_port, start_service

    port = free_port()
    svc = start_service("services.inference", Path(tempfile.mkdtemp()), {
        "FASHION_EXECUTION_PROVIDER": provider, "FASHION_INFERENCE_PORT": str(port),
        "FASHION_INFERENCE_METRICS_PORT": str(free_port()), "FASHION_LOG_STDOUT": "true"}, f"127.0.0.1:{port}")
    try:
        svc.wait_serving(timeout=180)
        with grpc.insecure_channel(svc.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            singles = [stub.Classify(pb.ClassifyRequest(image=p), timeout=10).category for p in pngs[:500]]
            batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[pb.ClassifyRequest(image=p)
                                                                       for p in pngs[:256]]), timeout=30)

            def classify(i: int) -> None:
                stub.Classify(pb.ClassifyRequest(image=pngs[i % len(pngs)]), timeout=10)

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(classify, range(200)))
                start = time.perf_counter()
                list(pool.map(classify, range(3000)))
                rate = 3000 / (time.perf_counter() - start)
        names = manifest.labels
        return {
            "execution_provider": info.execution_provider,
            "classify_accuracy_500": float(np.mean([s == names[y] for s, y in zip(singles, labels, strict=False)])),
            "classify_batch_accuracy_256": float(np.mean([r.category == names[y]
                                                          for r, y in zip(batch.results, labels, strict=False)])),
            "classify_c16_images_per_s": rate,
            "log_says": [line for line in svc.output().splitlines() if "Loaded" in line or "provider" in line][:3],
        }
    finally:
        svc.terminate()


def main() -> int:
    import argparse

    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda")
    provider = parser.parse_args().provider
    expected = engine.CUDA if provider == "cuda" else engine.CPU

    report: dict[str, object] = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(),
                                 "auto_prefers": engine.choose_providers("auto")}
    manifest = ModelManifest.load(SHIPPED_MODEL_DIR)
    x_img, y = fashion_mnist.load("test")
    pre = Preprocessor.from_manifest(manifest)
    pngs = [fashion_mnist.encode_png(img) for img in x_img[:N]]
    x = np.stack([pre(p) for p in pngs])
    cpu = OnnxModel(manifest, "cpu")
    gpu = OnnxModel(manifest, provider)
    run_file = manifest.model_path_for(expected).name
    same_file_cpu = OnnxModel(replace(manifest, file=run_file), "cpu")
    report["model_provider"] = gpu.provider

    def probs(model: OnnxModel) -> np.ndarray:
        return np.concatenate([model.run(x[i: i + 500]) for i in range(0, N, 500)])

    p_gpu, p_same, p_cpu = probs(gpu), probs(same_file_cpu), probs(cpu)
    report["file"] = run_file
    report["max_abs_prob_diff_same_file"] = float(np.abs(p_same - p_gpu).max())
    report["top1_agree_same_file"] = float(np.mean(p_same.argmax(1) == p_gpu.argmax(1)))
    report["accuracy"] = {"gpu": float(np.mean(p_gpu.argmax(1) == y[:N])),
                          "cpu_same_file": float(np.mean(p_same.argmax(1) == y[:N])),
                          "cpu_default_file": float(np.mean(p_cpu.argmax(1) == y[:N]))}
    report["model_alone_images_per_s"] = {"gpu": model_alone(gpu, x), "cpu": model_alone(cpu, x)}
    service = service_checks(manifest, pngs, y, provider)
    report["service"] = service
    ok = (gpu.provider == expected and report["auto_prefers"][0] == expected  # type: ignore[index]
          and report["top1_agree_same_file"] >= 0.999 and service["execution_provider"] == expected
          and float(service["classify_accuracy_500"]) > 0.85)  # type: ignore[arg-type]
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
