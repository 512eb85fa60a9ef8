"""The native load generator (bench/native/classify_load.cc), built with the system's gRPC C++ into
bench/work/native/ and run like `bench.loadgen --mode stream` (ClassifyStream) or `--mode classify`
(Classify, one call after another per user).

On these 2-core machines the load generator shares the cores with the service it measures; the
Python client spends about 100 µs of CPU a message (43% of a core at 4,400 messages/s), more than
the service's event loop does, so the stream figures it produces say as much about the client as
about the service. The C++ client drives the same
closed loop (streams x window, one image per message, latencies of the messages sent after the
warm-up) for a fraction of that. Needs g++, pkg-config, protoc and gRPC C++ (Debian:
`apt-get install libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc`); `make bench` installs them when it can.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

from bench.common import REPO

SOURCE = REPO / "bench" / "native" / "classify_load.cc"
PROTO = REPO / "protos" / "fashion" / "v1" / "inference.proto"
BUILD = REPO / "bench" / "work" / "native"


class NativeUnavailable(RuntimeError):
    """The C++ load generator cannot be built here; the message says what is missing."""


def build() -> Path:
    """The classify_load binary, (re)built when missing or older than its source or the proto."""
    binary = BUILD / "classify_load"
    if binary.exists() and binary.stat().st_mtime > max(SOURCE.stat().st_mtime, PROTO.stat().st_mtime):
        return binary
    missing = [tool for tool in ("g++", "pkg-config", "protoc", "grpc_cpp_plugin") if not shutil.which(tool)]
    if missing:
        raise NativeUnavailable(f"missing {', '.join(missing)} (apt-get install g++ pkg-config libgrpc++-dev "
                                "libprotobuf-dev protobuf-compiler-grpc)")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"], capture_output=True,
                           text=True)
    if flags.returncode != 0:
        raise NativeUnavailable(f"gRPC C++ not found by pkg-config: {flags.stderr.strip()}")
    BUILD.mkdir(parents=True, exist_ok=True)
    steps = [
        ["protoc", f"-I{REPO / 'protos'}", f"--cpp_out={BUILD}", f"--grpc_out={BUILD}",
         f"--plugin=protoc-gen-grpc={shutil.which('grpc_cpp_plugin')}", str(PROTO)],
        ["g++", "-O2", "-std=c++17", "-o", str(binary), str(SOURCE),
         str(BUILD / "fashion/v1/inference.pb.cc"), str(BUILD / "fashion/v1/inference.grpc.pb.cc"),
         f"-I{BUILD}", *flags.stdout.split(), "-lpthread"],
    ]
    for step in steps:
        out = subprocess.run(step, capture_output=True, text=True)
        if out.returncode != 0:
            raise NativeUnavailable(f"{step[0]} failed: {out.stderr[-1500:]}")
    return binary


def images_file(pngs: list[bytes]) -> Path:
    """The images in the binary's input format: each a 4-byte little-endian length and its bytes."""
    path = BUILD / "images.bin"
    BUILD.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(struct.pack("<I", len(p)) + p for p in pngs))
    return path


def stream(binary: Path, images: Path, address: str, concurrency: int, seconds: float = 8.0,
           warmup: float = 2.0, window: int = 64) -> dict[str, float]:
    """One closed-loop ClassifyStream run: bench.loadgen's JSON result."""
    return run(binary, "stream", images, address, concurrency, seconds, warmup, window)


def unary(binary: Path, images: Path, address: str, concurrency: int, seconds: float = 8.0,
          warmup: float = 2.0, channels: int = 0, cpus: str = "") -> dict[str, float]:
    """One closed-loop Classify run (`concurrency` users, one image a call) over `channels`
    connections (0: one per 16 users), pinned to the CPU list `cpus` (taskset's) when given."""
    return run(binary, "unary", images, address, concurrency, seconds, warmup, 1, channels, cpus)


def run(binary: Path, mode: str, images: Path, address: str, concurrency: int, seconds: float, warmup: float,
        window: int, channels: int = 0, cpus: str = "") -> dict[str, float]:
    args = [str(binary), mode, address, str(concurrency), str(window), str(seconds), str(warmup), str(images),
            str(channels)]
    if cpus:
        args = ["taskset", "--cpu-list", cpus, *args]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + warmup + 120)
    if out.returncode != 0:
        raise RuntimeError(f"classify_load {mode} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
