"""Bearer tokens from a file (a mounted Secret), read again whenever the file changes.

The file holds one token per line. A client sends the first; a server accepts any of them, so a
token is rotated without a failed call: add the new token as a second line everywhere (servers now
accept both), move it to the first line (clients send it), then remove the old one. Every use
costs one stat(), so a replaced file is seen by the very next call, on clients and servers alike
(and the file is read again at least every RECHECK_S, for an in-place rewrite that keeps its size
and timestamp). A file briefly empty or missing while it is being replaced keeps the last tokens.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

RECHECK_S = 1.0
log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """The token file cannot be read, or holds no token, and no earlier read succeeded."""


class TokenFile:
    """The tokens listed in one file, kept current."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tokens: tuple[str, ...] = ()
        self._signature: tuple[int, ...] | None = None
        self._read_at = 0.0
        self._refused: tuple[int, ...] | None = None  # the file version last refused (logged once)

    def tokens(self) -> tuple[str, ...]:
        """Every token listed, in order. Raises TokenFileError when none was ever read."""
        try:
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if signature != self._signature or time.monotonic() - self._read_at > RECHECK_S:
                self._read(signature)
        except OSError as exc:
            if not self._tokens:
                raise TokenFileError(f"cannot read the token file {self.path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:  # a half-written or wrong file: like a missing one, keep the last tokens
            if not self._tokens:
                raise TokenFileError(f"the token file {self.path} is not UTF-8 text (byte {exc.start})") from exc
            self._signature = signature  # read again when it changes (or at the next recheck), not at every call
            if self._refused != signature:
                self._refused = signature
                log.error("The token file %s is not UTF-8 text (byte %d): the last tokens read stay in use",
                          self.path, exc.start)
        if not self._tokens:
            raise TokenFileError(f"the token file {self.path} is empty")
        return self._tokens

    def primary(self) -> str:
        """The token a client sends: the first line."""
        return self.tokens()[0]

    def _read(self, signature: tuple[int, ...]) -> None:
        self._read_at = time.monotonic()
        text = self.path.read_text(encoding="utf-8")
        tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
        self._read_at = time.monotonic()
        if tokens:  # an empty file is a Secret being swapped: keep the last tokens
            self._tokens, self._signature = tokens, signature


@functools.lru_cache(maxsize=64)
def token_file(path: Path) -> TokenFile:
    """The TokenFile of `path`, one per process: every channel and server of a process shares its reads."""
    return TokenFile(path)
