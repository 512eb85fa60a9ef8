"""The `fashion` command: one CLI for serving, classifying, batch jobs and monitoring.

Commands parse their arguments (fashion.cli.arguments), call one entry point (a client call, or the
server package's entry point for what runs in this process) and print. Invalid FASHION_* values are
reported by the server package's entry points: one line per variable, exit 2."""

from __future__ import annotations

import importlib
import sys

from fashion.cli.arguments import build_parser
from fashion.cli.server import ServerNotInstalled

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, function = args.handler.split(":")
    command = getattr(importlib.import_module(f"fashion.cli.{module}"), function)
    try:
        return int(command(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fashion ... | head`: the reader has what it wanted
        from fashion.cli.terminal import silence_stdout  # here only: parsing stays free of grpc and rich

        silence_stdout()  # Python's flush at exit stays quiet
        return 0
    except ServerNotInstalled as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        from fashion.client import TlsFileError, TokenFileError  # here only: parsing stays free of grpc

        if not isinstance(exc, TlsFileError | TokenFileError):
            raise
        print(f"error: {exc}", file=sys.stderr)  # it names the file and its variable
        return 2


if __name__ == "__main__":
    sys.exit(main())
