"""Confinement of every job folder to the data root.

A job may only read and write under the configured data root. Paths given by callers are
resolved (symbolic links followed, `..` collapsed) before they are checked, so `../x`, an
absolute path elsewhere and a link inside the root that points out of it are all refused.
Inside the root, paths are stored relative to it (posix form), so records stay valid if the
whole data folder is moved. While a job runs, stored paths are never resolved again: its files
are reached through folder descriptors (tree.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

SHOWN_MAX = 512
"""Longer names are shown cut (a message quoting a 5,000-character name whole helps nobody)."""


def shown(raw: str) -> str:
    """`raw` quoted for a message; cut after 200 characters, with its length, when over SHOWN_MAX."""
    return repr(raw) if len(raw) <= SHOWN_MAX else f"{raw[:200]!r}... ({len(raw)} characters)"


def _cut(path: Path) -> str:
    """A resolved path for a message, cut as shown() cuts."""
    text = str(path)
    return text if len(text) <= SHOWN_MAX else f"{text[:200]}... ({len(text)} characters)"


class PathRefused(ValueError):
    """A caller's path is unusable (outside the data root, malformed, not a folder)."""


class FolderMissing(FileNotFoundError):
    """A caller's folder lies under the data root but does not exist."""


@dataclass(frozen=True)
class DataRoot:
    """The folder every job's input and output must lie under."""

    root: Path
    """As configured (relative to the working directory or absolute): used when showing paths."""

    @cached_property
    def real(self) -> Path:
        """The root with links resolved, once: every check compares against it."""
        return Path(os.path.realpath(self.root))

    def resolve(self, raw: str, what: str) -> Path:
        """The real path of `raw` (relative to the root, or absolute inside it). Raises PathRefused."""
        if not raw or not raw.strip():
            raise PathRefused(f"{what} is required")
        if "\x00" in raw:
            raise PathRefused(f"{what} contains a NUL byte")
        root = self.real
        candidate = Path(raw) if os.path.isabs(raw) else root / raw
        with self._refusing(raw, what):
            real = Path(os.path.realpath(candidate))
        if not real.is_relative_to(root):
            raise PathRefused(
                f"{what} {shown(raw)} resolves to {_cut(real)}, outside the data root {root}: only folders "
                f"under the data root can be processed")
        return real

    def folder(self, raw: str, what: str, create: bool = False) -> Path:
        """Like resolve(), and the result must be a folder (created when `create`)."""
        real = self.resolve(raw, what)
        with self._refusing(raw, what):
            if create:
                real.mkdir(parents=True, exist_ok=True)
            if not real.exists():
                raise FolderMissing(f"{what} {shown(raw)} does not exist under the data root ({_cut(real)})")
            if not real.is_dir():
                raise PathRefused(f"{what} {shown(raw)} is not a folder ({_cut(real)})")
        return real

    def not_a_folder(self, real: Path, raw: str, what: str) -> bool:
        """Whether `real` (from resolve()) exists as something other than a folder. Raises PathRefused."""
        with self._refusing(raw, what):
            return real.exists() and not real.is_dir()

    @staticmethod
    @contextmanager
    def _refusing(raw: str, what: str) -> Iterator[None]:
        """A folder the file system will not look at (name too long, permission denied, ...) is the caller's
        problem: PathRefused naming the folder and the reason, never the raw OSError (its text holds the path)."""
        try:
            yield
        except (PathRefused, FolderMissing):
            raise
        except OSError as exc:
            raise PathRefused(f"{what} {shown(raw)} cannot be used: {exc.strerror or type(exc).__name__}") from None

    def relative(self, path: Path) -> str:
        """`path` (under the real root) as stored in records: posix, relative to the root."""
        rel = path.relative_to(self.real)
        return PurePosixPath(*rel.parts).as_posix() if rel.parts else "."

    @cached_property
    def _shown(self) -> str:
        return str(self.root)

    def display(self, rel: str) -> str:
        """How logs show a stored path: under the root as the user configured it (data/processed_batches/...)."""
        return self._shown if rel == "." else f"{self._shown}/{rel}"


def check_log_dir_outside(data_root: Path, log_dir: Path) -> None:
    """Refuse logs kept inside the data root: the log files are opened by path, and whoever may upload into
    the root could swap the log folder for a link and have the service write its logs elsewhere. Raises
    ValueError naming both settings."""
    root, logs = Path(os.path.realpath(data_root)), Path(os.path.realpath(log_dir))
    if logs.is_relative_to(root):
        raise ValueError(f"FASHION_LOG_DIR ({log_dir}) lies inside FASHION_DATA_ROOT ({data_root}), where "
                         "uploaders could replace it with a link: keep the logs outside the data root")
