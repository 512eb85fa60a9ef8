"""`fashion serve|run|config`: the system itself, run by the server package's entry points."""

from __future__ import annotations

import argparse
import shutil
import textwrap

from fashion.cli.server import server_function


def serve(args: argparse.Namespace) -> int:
    """One service in the foreground (SIGTERM/Ctrl-C stops it cleanly)."""
    return int(server_function("serve", "serve")(args.service))


def run(args: argparse.Namespace) -> int:
    """The whole local stack in the foreground (what `make run` calls), each service in its own process."""
    return int(server_function("run", "run")(args.only))


def config(args: argparse.Namespace) -> int:
    """Every setting as its environment variable and current value (NAME=value, as an env file or
    `env` writes it: whole whatever the terminal's width, for grep), its meaning indented below."""
    width = max(40, shutil.get_terminal_size().columns)
    for variable, value, meaning in server_function("settings", "config")():
        print(f"{variable}={value}")
        print(textwrap.fill(" ".join(meaning.split()), width, initial_indent="    ", subsequent_indent="    "))
    return 0
