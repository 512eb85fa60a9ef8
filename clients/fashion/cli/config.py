"""`fashion config`: every setting, its environment variable, current value and meaning."""

from __future__ import annotations

import argparse
import importlib

from rich.console import Console
from rich.table import Table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show all settings with their environment variables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = importlib.import_module("services.common.config")
    classes = [c for c in vars(config).values()
               if isinstance(c, type) and issubclass(c, config.CommonSettings)]
    seen: set[str] = set()
    table = Table("variable", "value", "meaning")
    for cls in sorted(classes, key=lambda c: (c is not config.CommonSettings, c.__name__)):
        settings = cls()
        for name, field in type(settings).model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            table.add_row(f"FASHION_{name.upper()}", str(getattr(settings, name)), field.description or "")
    Console().print(table)
    return 0
