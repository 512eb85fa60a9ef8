"""Untrusted text (file and folder names, error messages that quote them) made safe to show in a log line
or a terminal: control characters (newlines, escape sequences, line separators) are written as Python
escapes, so that a name can neither forge a line nor drive the terminal."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with control characters written as Python escapes: "a\\nb" for a newline."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
