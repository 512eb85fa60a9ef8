"""Closed-loop gRPC load generator, run in its own process so that its CPU is not the server's.

`python -m bench.loadgen --mode classify --address HOST:PORT --concurrency 16 --seconds 10`
prints one JSON line: images/s, requests/s, p50/p99 latency (ms) and errors.

Modes: classify (fashion.v1 Classify, one image per request), batch (ClassifyBatch, --batch
images per request), stream (ClassifyStream, `concurrency` streams each keeping --window
messages in flight), modelinfer (KServe V2 ModelInfer through tritonclient's asyncio client,
one image per request, in the --form given: `normalized`, the model's own FP32 input, preprocessed
here with the manifest of --model-dir, which works against any KServe V2 server, MLServer
included; or the natural units our service declares: `fp32` pixels / 255 in [0, 1], `uint8` pixels
0-255, `png` the PNG file as BYTES).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np

MIB = 1 << 20


def load_images(n: int) -> list[bytes]:
    """n Fashion-MNIST test images as PNG files' bytes."""
    from services.inference import fashion_mnist

    x, _ = fashion_mnist.load("test")
    return [fashion_mnist.encode_png(img) for img in x[:n]]


def tensors(pngs: list[bytes], model_dir: str) -> np.ndarray:
    from services.inference.imaging import Preprocessor
    from services.inference.model import ModelManifest

    pre = Preprocessor.from_manifest(ModelManifest.load(model_dir))
    return np.stack([pre(p) for p in pngs])


FORMS = {"normalized": "FP32", "fp32": "FP32", "uint8": "UINT8", "png": "BYTES"}
"""ModelInfer input forms and their datatypes."""


def samples(form: str, pngs: list[bytes], model_dir: str | None) -> list[np.ndarray]:
    """One single-image tensor per request, in `form`."""
    if form == "png":
        return [np.array([p], dtype=np.object_) for p in pngs]
    if form == "normalized":
        if model_dir is None:
            raise SystemExit("--form normalized needs --model-dir (the manifest's preprocessing)")
        return [row[None] for row in tensors(pngs, model_dir)]
    from services.inference import fashion_mnist

    pixels = fashion_mnist.load("test")[0][: len(pngs), None]
    return [row[None] if form == "uint8" else row[None].astype(np.float32) / 255 for row in pixels]


class Recorder:
    def __init__(self, warmup_s: float, seconds: float) -> None:
        now = time.perf_counter()
        self.start = now + warmup_s
        self.stop = self.start + seconds
        self.latencies: list[float] = []
        self.images = 0
        self.errors = 0

    @property
    def running(self) -> bool:
        return time.perf_counter() < self.stop

    def record(self, began: float, images: int, ok: bool = True) -> None:
        if began >= self.start:
            if ok:
                self.latencies.append(time.perf_counter() - began)
                self.images += images
            else:
                self.errors += 1

    def result(self, seconds: float) -> dict[str, float]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([float("nan")])
        return {
            "images_per_s": self.images / seconds,
            "requests_per_s": len(self.latencies) / seconds,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "errors": self.errors,
        }


async def run_fashion(mode: str, address: str, concurrency: int, rec: Recorder, pngs: list[bytes],
                      batch: int, window: int) -> None:
    import grpc

    from fashion.v1 import inference_pb2 as pb
    from fashion.v1 import inference_pb2_grpc as pb_grpc

    opts = [("grpc.max_receive_message_length", 64 * MIB), ("grpc.max_send_message_length", 64 * MIB)]
    # One channel per 16 workers: a single HTTP/2 connection would serialize everything.
    channels = [grpc.aio.insecure_channel(address, options=[*opts, ("grpc.channel_id", i)])
                for i in range(max(1, concurrency // 16))]
    stubs = [pb_grpc.InferenceServiceStub(ch) for ch in channels]
    reqs = [pb.ClassifyRequest(image=p) for p in pngs]

    async def classify_worker(w: int) -> None:
        stub = stubs[w % len(stubs)]
        i = w
        while rec.running:
            began = time.perf_counter()
            try:
                await stub.Classify(reqs[i % len(reqs)], timeout=30)
                rec.record(began, 1)
            except grpc.RpcError:
                rec.record(began, 1, ok=False)
            i += concurrency

    async def batch_worker(w: int) -> None:
        stub = stubs[w % len(stubs)]
        i = w * batch
        while rec.running:
            items = [reqs[(i + k) % len(reqs)] for k in range(batch)]
            began = time.perf_counter()
            try:
                resp = await stub.ClassifyBatch(pb.ClassifyBatchRequest(images=items), timeout=60)
                rec.record(began, len(resp.results))
            except grpc.RpcError:
                rec.record(began, batch, ok=False)
            i += batch * concurrency

    async def stream_worker(w: int) -> None:
        stub = stubs[w % len(stubs)]
        sent: asyncio.Queue[float] = asyncio.Queue()
        slots = asyncio.Semaphore(window)

        async def requests():
            i = w
            while rec.running:
                await slots.acquire()
                sent.put_nowait(time.perf_counter())
                yield reqs[i % len(reqs)]
                i += concurrency

        async for _ in stub.ClassifyStream(requests(), timeout=rec.stop - time.perf_counter() + 30):
            rec.record(sent.get_nowait(), 1)
            slots.release()

    worker = {"classify": classify_worker, "batch": batch_worker, "stream": stream_worker}[mode]
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    for ch in channels:
        await ch.close()


async def run_modelinfer(address: str, model: str, concurrency: int, rec: Recorder, form: str,
                         x: list[np.ndarray]) -> None:
    import tritonclient.grpc.aio as triton

    clients = [triton.InferenceServerClient(address) for _ in range(max(1, concurrency // 16))]
    meta = await clients[0].get_model_metadata(model)
    # The input of the form's datatype (our service declares one per form; others have one input).
    input_name = next(i.name for i in meta.inputs if i.datatype == FORMS[form])
    output_name = meta.outputs[0].name
    # The model's own input on a server that also takes natural units is reachable explicitly only.
    parameters = {"normalized": True} if form == "normalized" and len(meta.inputs) > 1 else None

    async def worker(w: int) -> None:
        client = clients[w % len(clients)]
        i = w
        out = triton.InferRequestedOutput(output_name)
        while rec.running:
            sample = x[i % len(x)]
            inp = triton.InferInput(input_name, list(sample.shape), FORMS[form])
            inp.set_data_from_numpy(sample)
            began = time.perf_counter()
            try:
                result = await client.infer(model, [inp], outputs=[out], parameters=parameters)
                ok = result.as_numpy(output_name).shape[0] == 1
                rec.record(began, 1, ok)
            except Exception:
                rec.record(began, 1, ok=False)
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    for c in clients:
        await c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["classify", "batch", "stream", "modelinfer"], required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--model", default="fashion-mnist-cnn", help="model name (modelinfer)")
    p.add_argument("--model-dir", help="model folder whose preprocessing makes the normalized ModelInfer tensors")
    p.add_argument("--form", choices=list(FORMS), default="normalized", help="ModelInfer input form (modelinfer)")
    p.add_argument("--images", type=int, default=2000)
    args = p.parse_args()

    pngs = load_images(args.images)
    rec = Recorder(args.warmup, args.seconds)
    if args.mode == "modelinfer":
        x = samples(args.form, pngs, args.model_dir)
        asyncio.run(run_modelinfer(args.address, args.model, args.concurrency, rec, args.form, x))
    else:
        asyncio.run(run_fashion(args.mode, args.address, args.concurrency, rec, pngs, args.batch, args.window))
    print(json.dumps(rec.result(args.seconds)))


if __name__ == "__main__":
    main()
