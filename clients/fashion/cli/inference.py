"""`fashion classify`, `fashion stats` and `fashion model info|evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
from rich.table import Table

from fashion.cli.errors import rpc_failure
from fashion.cli.server import server_function
from fashion.cli.terminal import console as new_console
from fashion.cli.terminal import literal, silence_stdout
from fashion.client import ChannelOptions, InferenceClient
from fashion.client.imagefile import MESSAGE_OVERHEAD, ImageFileError, read_image_file
from fashion.client.protojson import dumps

BATCH = 64  # images per ClassifyBatch call
MIB = 1024 * 1024
CHUNK_BYTES = 8 * MIB  # image bytes per call, as the Batch service sends (FASHION_BATCH_CHUNK_BYTES)
MAX_TOP_K = 2**32 - 1
FOLDER = "a folder: name its images (fashion classify DIR/*), or sort all of it with fashion batch submit"


def evaluate(args: argparse.Namespace) -> int:
    evaluate_and_write = server_function("model_evaluate", "model evaluate")
    try:
        metrics, report, written = evaluate_and_write(args.model_dir, args.photos, args.non_fashion, args.threads,
                                                      args.batch_size, not args.no_benchmark, args.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=1) if args.json else report)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def read_image(path: Path, limit: int) -> bytes | str:
    """The file's bytes, or why it cannot be classified (one line): a file over what one call can carry would
    fail every image of its call, so it gets its own line (fashion.client.imagefile reads it safely)."""
    try:
        return read_image_file(path, limit)
    except ImageFileError as exc:
        return FOLDER if exc.kind == exc.FOLDER else exc.reason if exc.kind == exc.TOO_LARGE else \
            f"cannot read: {exc.reason}"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


def chunks(paths: list[Path], limit: int) -> Iterator[tuple[list[dict[str, object]], list[bytes]]]:
    """The files in order as ClassifyBatch calls: each call's answers (one per file, "error" set for a file
    that could not be read) and the images to send, at most BATCH of them and CHUNK_BYTES together
    (an image larger than that alone). Only one call's images are in memory at a time."""
    answers: list[dict[str, object]] = []
    images: list[bytes] = []
    size = 0
    for path in paths:
        data = read_image(path, limit)
        if isinstance(data, bytes) and images and (len(images) == BATCH or size + len(data) > CHUNK_BYTES):
            yield answers, images
            answers, images, size = [], [], 0
        answers.append({"file": str(path)})
        if isinstance(data, bytes):
            answers[-1]["image"] = len(images)  # its index among the call's images, until answered
            images.append(data)
            size += len(data)
        else:
            answers[-1]["error"] = data
    if answers:
        yield answers, images


def classify(args: argparse.Namespace) -> int:
    """Classify the files in the order given, BATCH or CHUNK_BYTES per call: 0 all classified, 1 some could
    not be (each says why), 2 the service failed a call (the answers before it are printed). A reader that
    goes away (`| head -1`) changes no exit code: the command carries on to it, silently."""
    if not 0 <= args.top_k <= MAX_TOP_K:  # a uint32 on the wire: protobuf would raise ValueError
        print(f"error: --top-k {args.top_k}: how many categories to show, 1 or more (0: the service's default, 3)",
              file=sys.stderr)
        return 2
    failures = 0
    rows: list[dict[str, object]] = []  # the table's, printed at the end; JSON lines go out as answered
    code = 0
    with InferenceClient(ChannelOptions.from_env(args.address, timeout_s=args.timeout)) as client:
        limit = client.options.max_message_bytes - MESSAGE_OVERHEAD
        for answers, images in chunks(args.images, limit):
            results = []
            if images:
                try:
                    results = list(client.classify_batch(images, top_k=args.top_k).results)
                except grpc.RpcError as exc:
                    print(rpc_failure(exc, "Inference", args.address, client.options.timeout_s), file=sys.stderr)
                    code = 2
                    break
            for answer in answers:
                if "image" in answer:
                    r = results[int(answer.pop("image"))]  # type: ignore[call-overload]
                    if r.HasField("error"):
                        answer["error"] = r.error.message
                    else:
                        answer.update(category=r.category, confidence=round(r.confidence, 4), uncertain=r.uncertain,
                                      top_k=[{"label": c.label, "confidence": round(c.confidence, 4)}
                                             for c in r.top_k])
            failures += sum("error" in answer for answer in answers)
            if args.json:
                write_out(partial(print, "\n".join(json.dumps(answer) for answer in answers), flush=True))
            else:
                rows.extend(answers)
    if rows:
        write_out(partial(print_table, rows))
    return code or (1 if failures else 0)


def write_out(print_it: Callable[[], None]) -> None:
    """`print_it()`, and if the reader has gone, nothing more ever reaches stdout (no BrokenPipeError)."""
    try:
        print_it()
    except BrokenPipeError:
        silence_stdout()


def print_table(rows: list[dict[str, object]]) -> None:
    table = Table("file", "category", "confidence", "top-k")
    for row in rows:
        if "error" in row:
            table.add_row(literal(str(row["file"])), literal("error", "red"), "", literal(str(row["error"])))
        else:
            conf = f"{100 * float(row['confidence']):.1f}%" + (" (uncertain)" if row["uncertain"] else "")
            top = ", ".join(f"{c['label']} {100 * c['confidence']:.1f}%" for c in row["top_k"])  # type: ignore[attr-defined]
            table.add_row(literal(str(row["file"])), literal(str(row["category"])), conf, literal(top))
    new_console().print(table)


def stats(args: argparse.Namespace) -> int:
    return _print_rpc(lambda c: c.stats(), args.address, args.timeout)


def model_info(args: argparse.Namespace) -> int:
    return _print_rpc(lambda c: c.model_info(), args.address, args.timeout)


def _print_rpc(fn, address: str, timeout_s: float | None) -> int:  # type: ignore[no-untyped-def]
    options = ChannelOptions.from_env(address, timeout_s=timeout_s)
    try:
        with InferenceClient(options) as client:
            msg = fn(client)
    except grpc.RpcError as exc:
        print(rpc_failure(exc, "Inference", address, options.timeout_s), file=sys.stderr)
        return 2
    print(dumps(msg))
    return 0
