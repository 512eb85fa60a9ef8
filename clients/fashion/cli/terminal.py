"""What the commands show that came from files or servers (names, folders, error messages), as rich
renders it literally: never read as markup (a name like "a[/]x.jpg" would end the command with a
MarkupError, "[red]x.jpg" would hide its brackets) and with control characters escaped."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fashion.client.text import printable


def literal(text: str, style: str = "") -> Text:
    """A table cell or line of `text` as it is."""
    return Text(printable(text), style=style)


def markup_free(text: str) -> str:
    """`text` for an f-string that also holds markup of our own: brackets and controls escaped."""
    return escape(printable(text))


def silence_stdout() -> None:
    """The reader of stdout has gone (`| head -1`): what is still printed, and Python's flush at exit, go
    nowhere instead of raising BrokenPipeError again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class PipeConsole(Console):
    """rich's Console, except when the reader has gone (`fashion batch list | head -1`): rich ends the
    command with SystemExit(1), which cron reads as a failed job. Here the output goes quiet and a
    BrokenPipeError reaches main() (exit 0), or, `keep_going`, the command carries on silently: a job run
    in this process finishes and exits with its own code."""

    def __init__(self, *args: Any, keep_going: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.keep_going = keep_going

    def on_broken_pipe(self) -> None:
        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.file.fileno())  # Python's flush at exit stays quiet
        if not self.keep_going:
            raise BrokenPipeError


def console(stderr: bool = False, keep_going: bool = False, **kwargs: Any) -> Console:
    """The console every command prints with."""
    return PipeConsole(stderr=stderr, keep_going=keep_going, **kwargs)
