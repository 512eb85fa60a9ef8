"""The `fashion` command: one CLI for serving, classifying, batch jobs and monitoring."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module registers its subcommands with `register(subparsers)`.
_COMMAND_MODULES = ("serve", "run", "inference", "batch", "monitor", "config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashion", description="Fashion-image classifier: services and tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"fashion.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from services.common.config import invalid_settings_message

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:  # an unusable FASHION_* value: say which, in one line each, exit 2
        print(invalid_settings_message(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
