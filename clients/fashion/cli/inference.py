"""`fashion classify`, `fashion stats` and `fashion model info|evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from rich.table import Table

from fashion.cli.errors import rpc_failure
from fashion.cli.server import server_function
from fashion.cli.terminal import console as new_console
from fashion.cli.terminal import literal
from fashion.client import InferenceClient
from fashion.client.protojson import dumps

BATCH = 64


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


def classify(args: argparse.Namespace) -> int:
    failures = 0
    rows: list[dict[str, object]] = []
    with InferenceClient(args.address) as client:
        paths: list[Path] = args.images
        for start in range(0, len(paths), BATCH):
            chunk = paths[start: start + BATCH]
            answers: list[dict[str, object]] = [{"file": str(path)} for path in chunk]  # in the order given
            readable: list[tuple[dict[str, object], bytes]] = []
            for path, answer in zip(chunk, answers, strict=True):
                try:
                    readable.append((answer, path.read_bytes()))
                except IsADirectoryError:
                    answer["error"] = "a folder: name its images (fashion classify DIR/*), or sort all of it with " \
                                      "fashion batch submit"
                except OSError as exc:
                    answer["error"] = f"cannot read: {exc.strerror}"
            if readable:
                try:
                    resp = client.classify_batch([data for _, data in readable], top_k=args.top_k)
                except grpc.RpcError as exc:
                    print(rpc_failure(exc, "Inference", args.address), file=sys.stderr)
                    return 2
                for (answer, _), r in zip(readable, resp.results, strict=True):
                    if r.HasField("error"):
                        answer["error"] = r.error.message
                    else:
                        answer.update(category=r.category, confidence=round(r.confidence, 4), uncertain=r.uncertain,
                                      top_k=[{"label": c.label, "confidence": round(c.confidence, 4)} for c in r.top_k])
            failures += sum("error" in answer for answer in answers)
            rows.extend(answers)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        table = Table("file", "category", "confidence", "top-k")
        for row in rows:
            if "error" in row:
                table.add_row(literal(str(row["file"])), literal("error", "red"), "", literal(str(row["error"])))
            else:
                conf = f"{100 * float(row['confidence']):.1f}%" + (" (uncertain)" if row["uncertain"] else "")
                top = ", ".join(f"{c['label']} {100 * c['confidence']:.1f}%" for c in row["top_k"])  # type: ignore[attr-defined]
                table.add_row(literal(str(row["file"])), literal(str(row["category"])), conf, literal(top))
        new_console().print(table)
    return 1 if failures else 0


def stats(args: argparse.Namespace) -> int:
    return _print_rpc(lambda c: c.stats(), args.address)


def model_info(args: argparse.Namespace) -> int:
    return _print_rpc(lambda c: c.model_info(), args.address)


def _print_rpc(fn, address: str) -> int:  # type: ignore[no-untyped-def]
    try:
        with InferenceClient(address) as client:
            msg = fn(client)
    except grpc.RpcError as exc:
        print(rpc_failure(exc, "Inference", address), file=sys.stderr)
        return 2
    print(dumps(msg))
    return 0
