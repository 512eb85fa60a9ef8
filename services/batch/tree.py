"""Folders under the data root reached through directory file descriptors, never through paths.

A folder is opened one component at a time from a descriptor of the data root, each with
O_DIRECTORY | O_NOFOLLOW: a component that is a symbolic link (wherever it points), a file or
missing is refused with the reason. Files are then read, linked, renamed, unlinked and stat'ed
relative to the folder's descriptor (`dir_fd`, `src_dir_fd`, `dst_dir_fd`, `follow_symlinks=False`),
so no path is resolved again after it was checked: a folder swapped for a link after it was opened
is not followed, and one swapped before it is opened is refused.

An OpenFolders holds the descriptors of one short piece of work (one read pass, one sorted group)
and closes them together: the next piece opens them again from the root, so a swap between two
pieces is seen by the next one. It keeps at most MAX_OPEN of them (a catalog with a folder per
product must not run out of descriptors), closing the least recently used first: a descriptor it
returned is good until MAX_OPEN other folders were opened after it.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import NamedTuple

from services.batch.paths import DataRoot

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_OPEN = 256


class FolderRefused(OSError):
    """A folder of a stored path cannot be reached without following a link (or does not exist)."""


class Entry(NamedTuple):
    """A name in an open folder: what the *at() calls take."""

    folder: int
    """The folder's descriptor."""
    name: str


class OpenFolders:
    """Descriptors of folders under the data root, by root-relative path, opened on first use."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root
        self._fds: dict[str, int] = {}
        self._fds["."] = os.open(root.real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> OpenFolders:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def release(self, rel: str) -> None:
        """Close one folder's descriptor (opened again from its parent if needed later)."""
        fd = self._fds.pop(rel, None)
        if fd is not None:
            os.close(fd)

    def folder(self, rel: str, create: bool = False) -> int:
        """The descriptor of the folder `rel` (root-relative, posix), created when `create`.
        Raises FolderRefused naming the component that is a link, not a folder, or missing."""
        # From the nearest folder already open, down one component at a time: iteratively, since a
        # tree may be nested deeper than Python's recursion limit.
        missing: list[str] = []
        current = rel
        while (fd := self._fds.pop(current, None)) is None:
            if current == ".":
                raise ValueError("these folders were closed")
            missing.append(current)
            current = parent(current)
        self._fds[current] = fd  # the most recently used last
        for current in reversed(missing):
            fd = self._open_child(fd, current, create)
        return fd

    def _open_child(self, parent_fd: int, rel: str, create: bool) -> int:
        """Open (create when `create`) the folder `rel` in its parent's descriptor, and keep it."""
        name = basename(rel)
        if not name or name in (".", ".."):
            raise FolderRefused(errno.EINVAL, f"{self.root.display(rel)} is not a plain path under the data root")
        if create:
            try:
                os.mkdir(name, dir_fd=parent_fd)
            except FileExistsError:
                pass
            except OSError as exc:
                raise FolderRefused(exc.errno, f"cannot create {self.root.display(rel)}: {exc.strerror}") from exc
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            raise FolderRefused(exc.errno, self._why(parent_fd, name, rel, exc)) from exc
        self._fds[rel] = fd
        if len(self._fds) > MAX_OPEN:  # never the parent just used: it is the most recent but one
            self.release(next(k for k in self._fds if k != "."))
        return fd

    def entry(self, rel: str, create: bool = False) -> Entry:
        """The file `rel` as (its folder's descriptor, its name). Raises FolderRefused."""
        return Entry(self.folder(parent(rel), create), basename(rel))

    def _why(self, parent_fd: int, name: str, rel: str, exc: OSError) -> str:
        shown = self.root.display(rel)
        try:
            mode = os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode
        except OSError:
            return f"{shown} {'does not exist' if exc.errno == errno.ENOENT else 'cannot be opened: ' + exc.strerror}"
        if stat.S_ISLNK(mode):
            return f"{shown} is now a symbolic link (links are not followed)"
        if not stat.S_ISDIR(mode):
            return f"{shown} is no longer a folder"
        return f"{shown} cannot be opened: {exc.strerror}"


def lstat_or_none(entry: Entry) -> os.stat_result | None:
    """The entry's own status (a link is not followed), None when it does not exist."""
    try:
        return os.stat(entry.name, dir_fd=entry.folder, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove(entry: Entry) -> None:
    """Unlink the entry if it exists."""
    try:
        os.unlink(entry.name, dir_fd=entry.folder)
    except FileNotFoundError:
        pass


# Stored (root-relative, posix) paths are handled as strings: pathlib costs too much per image.
def join(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"


def parent(rel: str) -> str:
    return rel.rpartition("/")[0] or "."


def basename(rel: str) -> str:
    return rel.rpartition("/")[2]
