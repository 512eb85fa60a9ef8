"""`fashion serve SERVICE`: run one service in the foreground (SIGTERM/Ctrl-C stops it cleanly)."""

from __future__ import annotations

import argparse
import importlib

# service name -> module with a main() that runs it
SERVICES = {
    "inference": "services.inference.app",
    "batch": "services.batch.app",
    "monitor": "services.monitor.app",
    "gateway": "services.gateway.app",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one service in the foreground")
    p.add_argument("service", choices=sorted(SERVICES))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    importlib.import_module(SERVICES[args.service]).main()
    return 0
