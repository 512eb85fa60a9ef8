"""Bearer tokens from a file (a mounted Secret), read again whenever the file changes.

The file holds one token per line (a line starting with `#` is a comment). A client sends the first;
a server accepts any of them, so a token is rotated without a failed call: add the new token as a
second line everywhere (servers now accept both), move it to the first line (clients send it), then
remove the old one. Every use
costs one stat(), so a replaced file is seen by the very next call, on clients and servers alike
(and the file is read again at least every RECHECK_S, for an in-place rewrite that keeps its size
and timestamp). A file briefly empty or missing while it is being replaced keeps the last tokens
(an ERROR names it, at most once a minute, while it stays so: writing the new token is how to
revoke). Each token is stripped of surrounding whitespace and a UTF-8 byte order mark (a Windows
editor's BOM and CRLF, an `echo`ed Secret's newline) and must be printable ASCII, all an HTTP header
carries; a file writable by group or others is refused (any local user could add a token). A
rewrite the rules refuse keeps the last tokens too, and is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import time
from pathlib import Path

RECHECK_S = 1.0
STALE_LOG_INTERVAL_S = 60.0
"""How often, at most, a token file that is missing or holds no token is logged while it stays so."""
log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """A bearer token setting that cannot work: the token file cannot be read or holds no usable token,
    and no earlier read succeeded; or FASHION_AUTH_TOKEN is not a usable token."""


def clean_token(value: str) -> str:
    """`value` without a UTF-8 byte order mark and surrounding whitespace."""
    return value.strip().removeprefix("\ufeff").strip()


def token_problem(token: str) -> str | None:
    """Why a cleaned token cannot be sent as `authorization: Bearer <token>`; None when it can."""
    if not token:
        return "is empty once stripped of surrounding whitespace"
    if not (token.isascii() and token.isprintable()):
        return "holds characters other than printable ASCII (an HTTP header carries no others)"
    return None


def setting_token(value: str, setting: str = "FASHION_AUTH_TOKEN") -> str:
    """The token a setting holds, cleaned; TokenFileError naming the setting (never the value) when
    it cannot work."""
    token = clean_token(value)
    if (problem := token_problem(token)) is not None:
        raise TokenFileError(f"{setting} {problem}")
    return token


class _Refused(Exception):
    """What makes the file as it is now unusable: `reason` completes "the token file <path> ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenFile:
    """The tokens listed in one file, kept current."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tokens: tuple[str, ...] = ()
        self._signature: tuple[int, ...] | None = None
        self._read_at = 0.0
        self._refused: tuple[int, ...] | None = None  # the file version last refused (logged once)
        self._stale_logged: tuple[str, float] | None = None  # why no token was read (unreadable, empty), when logged

    def tokens(self) -> tuple[str, ...]:
        """Every token listed, in order. Raises TokenFileError when none was ever read."""
        try:
            st = os.stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if signature != self._signature or time.monotonic() - self._read_at > RECHECK_S:
                self._read(signature, st.st_mode)
        except OSError as exc:
            if not self._tokens:
                raise TokenFileError(f"cannot read the token file {self.path}: {exc.strerror}") from exc
            self._log_stale(f"cannot be read ({exc.strerror})")  # missing, mostly
        except _Refused as refused:  # a wrong or half-written file: like a missing one, keep the last tokens
            if not self._tokens:
                raise TokenFileError(f"the token file {self.path} {refused.reason}") from None
            self._signature = signature  # read again when it changes (or at the next recheck), not at every call
            if self._refused != signature:
                self._refused = signature
                log.error("The token file %s %s: the last tokens read stay in use", self.path, refused.reason)
        if not self._tokens:
            raise TokenFileError(f"the token file {self.path} is empty")
        return self._tokens

    def primary(self) -> str:
        """The token a client sends: the first line."""
        return self.tokens()[0]

    def _read(self, signature: tuple[int, ...], mode: int) -> None:
        self._read_at = time.monotonic()
        if mode & (stat.S_IWGRP | stat.S_IWOTH):  # mode bits, not access(): root may write anything
            raise _Refused(f"is writable by group or others (mode {stat.S_IMODE(mode):04o}): any local user could "
                           "add a token; make it writable by its owner alone (chmod go-w)")
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise _Refused(f"is not UTF-8 text (byte {exc.start})") from None
        self._read_at = time.monotonic()
        tokens = []
        for number, line in enumerate(text.splitlines(), 1):
            token = clean_token(line)
            if not token or token.startswith("#"):  # blank lines and comments: skipped (never a token)
                continue
            if (problem := token_problem(token)) is not None:
                raise _Refused(f"line {number} {problem}")
            tokens.append(token)
        if not tokens:  # a Secret being swapped, or a mistake: keep the last tokens, say so
            self._signature = signature
            self._log_stale("holds no token")
            return
        self._tokens, self._signature, self._stale_logged = tuple(tokens), signature, None

    def _log_stale(self, state: str) -> None:
        """An ERROR when the file turns missing or empty while the last tokens are kept, then at most once
        a minute while it stays so."""
        now = time.monotonic()
        last = self._stale_logged
        if self._tokens and (last is None or last[0] != state or now - last[1] >= STALE_LOG_INTERVAL_S):
            self._stale_logged = (state, now)
            log.error("The token file %s %s: the last tokens read are still accepted (and sent); to revoke "
                      "them, write the new token to it", self.path, state)


@functools.lru_cache(maxsize=64)
def token_file(path: Path) -> TokenFile:
    """The TokenFile of `path`, one per process: every channel and server of a process shares its reads."""
    return TokenFile(path)
