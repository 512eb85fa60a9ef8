"""What the commands show that came from files or servers (names, folders, error messages), as rich
renders it literally: never read as markup (a name like "a[/]x.jpg" would end the command with a
MarkupError, "[red]x.jpg" would hide its brackets) and with control characters escaped."""

from __future__ import annotations

from rich.markup import escape
from rich.text import Text

from fashion.client.text import printable


def literal(text: str, style: str = "") -> Text:
    """A table cell or line of `text` as it is."""
    return Text(printable(text), style=style)


def markup_free(text: str) -> str:
    """`text` for an f-string that also holds markup of our own: brackets and controls escaped."""
    return escape(printable(text))
