"""The transport's own bounds: a bare grpc.aio echo (no protobuf, no work), server and client in their
own processes, messages the size of a Fashion-MNIST PNG.

    python -m bench.echo            # ClassifyStream's bound: {"messages_per_s": ...}
    python -m bench.echo --unary    # one gRPC hop at one user: p50 round trip and server CPU per call

The stream is driven like bench.loadgen drives ClassifyStream (16 streams, 64 messages in flight
each). --unary makes unary calls one after another, over TCP and over a Unix socket, as the REST
gateway calls the Inference service for a lone request. Whatever the service does per image comes
on top of this on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time

import grpc

from bench.common import cpu_seconds, free_port

METHOD = "/bench.Echo/Stream"


UNARY = "/bench.Echo/Unary"


async def serve(port: int, unix_path: str | None) -> None:
    async def echo(requests, context):  # type: ignore[no-untyped-def]
        async for message in requests:
            yield message

    async def unary(request, context):  # type: ignore[no-untyped-def]
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo),
                       "Unary": grpc.unary_unary_rpc_method_handler(unary)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    if unix_path:
        server.add_insecure_port(f"unix:{unix_path}")
    await server.start()
    await server.wait_for_termination()


async def drive(address: str, streams: int, window: int, size: int, seconds: float, warmup: float) -> float:
    channel = grpc.aio.insecure_channel(address)
    await channel.channel_ready()
    call = channel.stream_stream(METHOD)
    payload = os.urandom(size)
    began = time.perf_counter() + warmup
    ended = began + seconds
    counted = [0]

    async def one() -> None:
        room = asyncio.Semaphore(window)

        async def requests():  # type: ignore[no-untyped-def]
            while time.perf_counter() < ended:
                await room.acquire()
                yield payload

        async for _ in call(requests()):
            room.release()
            if began <= time.perf_counter() < ended:
                counted[0] += 1

    await asyncio.gather(*(one() for _ in range(streams)))
    await channel.close()
    return counted[0] / seconds


async def drive_unary(address: str, size: int, seconds: float, warmup: float) -> tuple[float, int]:
    """Unary calls one after another for `warmup` then `seconds`: the p50 round trip (ms) and the calls
    measured."""
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        call = channel.unary_unary(UNARY)
        payload = os.urandom(size)
        began = time.perf_counter() + warmup
        ended = began + seconds
        took: list[float] = []
        while (now := time.perf_counter()) < ended:
            await call(payload)
            if now >= began:
                took.append(time.perf_counter() - now)
    took.sort()
    return took[len(took) // 2] * 1000, len(took)


def unary_hop(server_pid: int, address: str, size: int, seconds: float, warmup: float) -> dict[str, float]:
    cpu_before = cpu_seconds(server_pid)
    p50, calls = asyncio.run(drive_unary(address, size, seconds, warmup))
    cpu = cpu_seconds(server_pid) - cpu_before  # the warm-up's calls add a little
    return {"p50_ms": p50, "calls_per_s": calls / seconds, "server_cpu_us_per_call": cpu / calls * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-unix", help=argparse.SUPPRESS)
    p.add_argument("--unary", action="store_true", help="one unary call at a time, over TCP and a Unix socket")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--size", type=int, default=400)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args()
    if args.serve:
        import uvloop  # as the services run

        uvloop.run(serve(args.serve, args.serve_unix))
        return
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        unix_path = os.path.join(folder, "echo.sock")
        server = subprocess.Popen([sys.executable, "-m", "bench.echo", "--serve", str(port), "--serve-unix", unix_path])
        try:
            if args.unary:
                result: dict[str, object] = {
                    transport: unary_hop(server.pid, address, args.size, args.seconds, args.warmup)
                    for transport, address in (("tcp", f"127.0.0.1:{port}"), ("unix", f"unix:{unix_path}"))}
            else:
                result = {"messages_per_s": asyncio.run(drive(f"127.0.0.1:{port}", args.streams, args.window,
                                                              args.size, args.seconds, args.warmup))}
        finally:
            server.terminate()
            server.wait(10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
