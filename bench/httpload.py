"""Closed-loop HTTP load generator for POST /predict (multipart upload), in its own process:

    python -m bench.httpload --url http://127.0.0.1:8080/predict --concurrency 64 --seconds 8

prints one JSON line like bench.loadgen: images/s, requests/s, p50/p99 latency (ms), errors.
aiohttp with keep-alive and pre-encoded bodies, so that the client costs as little CPU as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

from bench.loadgen import Recorder, load_images

BOUNDARY = "fashionbenchboundary"


def multipart(png: bytes) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="item.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    return head + png + f"\r\n--{BOUNDARY}--\r\n".encode()


async def run(url: str, concurrency: int, rec: Recorder, bodies: list[bytes], headers: dict[str, str]) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", **headers}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(w: int) -> None:
            i = w
            while rec.running:
                began = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as resp:
                        body = await resp.read()
                        rec.record(began, 1, resp.status == 200 and b'"category"' in body)
                except (aiohttp.ClientError, TimeoutError):
                    rec.record(began, 1, ok=False)
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--token", default="", help="bearer token to send")
    args = p.parse_args()
    bodies = [multipart(png) for png in load_images(args.images)]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    rec = Recorder(args.warmup, args.seconds)
    import uvloop  # uvicorn[standard] brings it; the client must not be the bottleneck

    uvloop.run(run(args.url, args.concurrency, rec, bodies, headers))
    print(json.dumps(rec.result(args.seconds)))


if __name__ == "__main__":
    main()
