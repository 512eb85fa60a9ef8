"""The commands that run the system in this process (serve, run, config and the embedded modes) come
with the server package, which declares them as `fashion.server` entry points. The client CLI parses
their arguments, calls the entry point and prints; without the server package it says what to install."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ENTRY_POINT_GROUP = "fashion.server"


class ServerNotInstalled(Exception):
    """The command needs the server package, which is not installed."""


def server_function(name: str, command: str) -> Callable[..., Any]:
    """The server package's entry point `name`, for `fashion COMMAND`. Raises ServerNotInstalled."""
    from importlib.metadata import entry_points  # only for the commands that need it: --help stays quick

    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise ServerNotInstalled(
            f"`fashion {command}` runs the system in this process: it needs the server package "
            "(pip install fashion-classifier; in a checkout of the project: pip install ./clients .)")
    return next(iter(found)).load()
