"""`fashion serve|run|config`: the system itself, run by the server package's entry points."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from fashion.cli.server import server_function


def serve(args: argparse.Namespace) -> int:
    """One service in the foreground (SIGTERM/Ctrl-C stops it cleanly)."""
    return int(server_function("serve", "serve")(args.service))


def run(args: argparse.Namespace) -> int:
    """The whole local stack in the foreground (what `make run` calls), each service in its own process."""
    return int(server_function("run", "run")(args.only))


def config(args: argparse.Namespace) -> int:
    """Every setting, its environment variable, current value and meaning."""
    table = Table("variable", "value", "meaning")
    for variable, value, meaning in server_function("settings", "config")():
        table.add_row(variable, value, meaning)
    Console().print(table)
    return 0
