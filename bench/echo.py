"""The transport's own bound on ClassifyStream: a bare grpc.aio bidirectional echo (no protobuf, no
work), driven like bench.loadgen drives ClassifyStream (16 streams, 64 messages in flight each,
messages the size of a Fashion-MNIST PNG), server and client in their own processes:

    python -m bench.echo            # prints {"messages_per_s": ...}

Whatever the service does per image comes on top of this on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import grpc

from bench.common import free_port

METHOD = "/bench.Echo/Stream"


async def serve(port: int) -> None:
    async def echo(requests, context):  # type: ignore[no-untyped-def]
        async for message in requests:
            yield message

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--size", type=int, default=400)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args()
    if args.serve:
        import uvloop  # as the services run

        uvloop.run(serve(args.serve))
        return
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.echo", "--serve", str(port)])
    try:
        rate = asyncio.run(drive(f"127.0.0.1:{port}", args.streams, args.window, args.size, args.seconds,
                                 args.warmup))
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps({"messages_per_s": rate}))


if __name__ == "__main__":
    main()
