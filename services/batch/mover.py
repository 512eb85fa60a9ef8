"""Moving and copying sorted images without ever overwriting or losing one.

Same filesystem, move: `link(source, destination)` then `unlink(source)`. link() fails when the
destination exists, so a name taken at the last moment is never overwritten (rename() would
silently replace it). Other filesystem, or copy mode: copy to a hidden staging file in the
destination folder, fsync, link it to the destination name, remove the staging file, then (move)
remove the source. Filesystems without hard links fall back to an existence check and rename().

Every step leaves a state `complete()` can finish after a crash: given the recorded source,
destination and staging name it tells whether the transfer happened (and removes the leftovers),
must be redone, or whether the source vanished.
"""

from __future__ import annotations

import enum
import errno
import filecmp
import os
import re
import shutil
import stat
from collections.abc import Container, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.batch import failpoints

UNCERTAIN_FOLDER = "_uncertain"
FAILED_FOLDER = "_failed"
NAME_MAX_BYTES = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._-]+")
# errno values meaning "this filesystem has no hard links".
FSYNC_THREADS = 16
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def category_folder(label: str) -> str:
    """A filesystem-safe folder name for a label, the same on Linux, macOS and Windows shares.

    Runs of characters other than ASCII letters, digits, space, ".", "_" and "-" become "_"
    ("T-shirt/top" -> "T-shirt_top"); leading dots, underscores and spaces and trailing dots and
    spaces are removed (so no label can be hidden or collide with _uncertain/ and _failed/).
    """
    name = _UNSAFE.sub("_", label).lstrip("._ ").rstrip(". ")
    return name[:100] or "unnamed"


def unique_name(name: str, *taken: Container[str]) -> str:
    """`name`, or `stem_1.ext`, `stem_2.ext`, ...: the first in none of `taken` (names present in the
    folder, names reserved by transfers in flight)."""
    stem, ext = os.path.splitext(name)
    candidate, n = name, 0
    while any(candidate in names for names in taken):
        n += 1
        suffix = f"_{n}{ext}"
        budget = NAME_MAX_BYTES - len(suffix.encode())
        candidate = stem.encode()[:budget].decode(errors="ignore") + suffix
    return candidate


class Resume(enum.Enum):
    """What a recorded, possibly interrupted transfer needs."""

    DONE = "done"
    """The file is at its destination (leftovers removed)."""
    REDO = "redo"
    """The file is still at its source: transfer it again (under a fresh name if needed)."""
    MISSING = "missing"
    """Neither source nor destination exists: someone else removed the file."""


class FileMover:
    """Moves or copies one file at a time; never overwrites."""

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self._pool: ThreadPoolExecutor | None = None

    @staticmethod
    def staging_path(destination: str | Path, tag: str) -> str:
        return os.path.join(os.path.dirname(destination), f".batch-{tag}.part")

    def transfer(self, source: str | Path, destination: str | Path, copy: bool, tag: str) -> None:
        """Move or copy `source` to `destination`. Raises FileExistsError when the destination
        name is taken (pick another), OSError for the rest (source vanished, no space, ...)."""
        if not copy:
            try:
                os.link(source, destination, follow_symlinks=False)  # a link swapped in is moved, not followed
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    self._copy(source, destination, tag)
                    self.sync_folders([os.path.dirname(destination)])  # the copy is durable before the source goes
                    os.unlink(source)
                    return
                if exc.errno not in _NO_LINKS:
                    raise
                self._rename_if_free(source, destination)
                return
            failpoints.reached("linked")
            os.unlink(source)
            return
        self._copy(source, destination, tag)

    def _copy(self, source: str | Path, destination: str | Path, tag: str) -> None:
        if not stat.S_ISREG(os.lstat(source).st_mode):  # copying would follow a link or block on a FIFO
            raise OSError(errno.EINVAL, "no longer a regular file", str(source))
        staging = self.staging_path(destination, tag)
        _remove(staging)  # a partial copy from an interrupted attempt
        try:
            shutil.copyfile(source, staging)
            shutil.copystat(source, staging)
            if self.fsync:
                fd = os.open(staging, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            try:
                os.link(staging, destination)
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                self._rename_if_free(staging, destination)
        finally:
            _remove(staging)

    @staticmethod
    def _rename_if_free(source: str | Path, destination: str | Path) -> None:
        # Only for filesystems without hard links: a tiny window remains between check and rename.
        if os.path.lexists(destination):
            raise FileExistsError(errno.EEXIST, "destination exists", str(destination))
        os.rename(source, destination)

    def complete(self, source: str | Path, destination: str | Path, copy: bool, tag: str) -> Resume:
        """Finish or diagnose a transfer recorded as started (after a crash)."""
        # A staging file is either already linked to the destination or an unfinished copy: drop it.
        _remove(self.staging_path(destination, tag))
        if not os.path.lexists(destination):
            return Resume.REDO if os.path.lexists(source) else Resume.MISSING
        if not os.path.lexists(source):
            return Resume.DONE
        if os.path.samefile(source, destination) or filecmp.cmp(source, destination, shallow=False):
            if not copy:
                os.unlink(source)  # linked or copied, but the source was not removed yet
            return Resume.DONE
        return Resume.REDO  # the name was taken by another file: transfer again under a new name

    def sync_folders(self, folders: Iterable[str | Path]) -> None:
        """fsync folders so that the links and unlinks in them survive a power loss. In parallel: the
        filesystem commits concurrent fsyncs together (on ext4, 12 folders cost about a fifth)."""
        if not self.fsync:
            return
        unique = list(set(map(str, folders)))
        if len(unique) == 1:
            _fsync_folder(unique[0])
        elif unique:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
            list(self._pool.map(_fsync_folder, unique))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (SMB) refuse fsync on folders; the data itself was synced
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
