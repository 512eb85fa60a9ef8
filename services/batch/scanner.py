"""Finding a job's images in its input folder.

Images are recognised by extension (the formats the Inference service decodes); a file with an
image extension that turns out unreadable is the Inference service's to judge and ends in
_failed/. Other regular files are reported as skipped and stay where they are. Hidden files
(".name") and temporary files (partial downloads, editor swap files, Office lock files) are
ignored: they are usually still being written. Symbolic links are never followed: folders are
opened through descriptors from the data root down (services/batch/tree.py).

A problem with one entry (a subfolder that cannot be read, a file deleted while the folder is
listed) skips that entry, with the reason; only an unreadable input folder stops the scan.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Container
from dataclasses import dataclass, field

from services.batch.tree import FolderRefused, OpenFolders, join

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
})
TEMPORARY_SUFFIXES = frozenset({
    ".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", ".swx", ".lock",
})
FUTURE_TOLERANCE_S = 300.0
"""How far in the future a file's modification time may be and still be taken for a write in progress
(clocks of a network file system's server and this machine differ by a little)."""


def is_hidden_or_temporary(name: str) -> bool:
    lower = name.lower()
    return (name.startswith((".", "~$")) or name.endswith("~")
            or os.path.splitext(lower)[1] in TEMPORARY_SUFFIXES)


@dataclass
class FolderScan:
    images: list[str] = field(default_factory=list)
    """Root-relative posix paths, sorted by component."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Entries left in place (root-relative), with the reason."""
    ignored: int = 0
    """Hidden and temporary files (not reported one by one)."""


def scan_folder(folders: OpenFolders, folder: str, recursive: bool, exclude: Container[str] = (),
                min_age_s: float = 0.0) -> FolderScan:
    """The images under the root-relative `folder` and the entries left alone.

    `exclude` are root-relative folders not descended into (the job's output folder when it lies
    inside the input, the jobs database folder). Raises OSError when `folder` itself cannot be read.
    """
    result = FolderScan()
    now = time.time()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(folders.folder(current)) as listing:
                entries = sorted(listing, key=lambda e: e.name)
            for entry in entries:
                _classify_entry(entry, join(current, entry.name), result, pending, recursive, exclude, now,
                                min_age_s)
        except OSError as exc:
            if current == folder:
                raise
            reason = exc.strerror if isinstance(exc, FolderRefused) else f"folder cannot be read: {exc.strerror}"
            result.skipped.append((current, reason))
        finally:
            if current != folder:
                folders.release(current)  # a deep tree must not hold a descriptor per folder
    result.images.sort(key=lambda p: p.split("/"))  # the order Path sorts in: by component
    result.skipped.sort()
    return result


def _classify_entry(entry: os.DirEntry[str], rel: str, result: FolderScan, pending: list[str], recursive: bool,
                    exclude: Container[str], now: float, min_age_s: float) -> None:
    if is_hidden_or_temporary(entry.name):
        result.ignored += 1
        return
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (a legacy-encoded share): named in reports, never touched
        shown = os.fsencode(rel).decode("utf-8", "backslashreplace")
        result.skipped.append((shown, "the file name is not valid UTF-8"))
        return
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        result.skipped.append((rel, "disappeared while the folder was being listed"))
        return
    except OSError as exc:
        result.skipped.append((rel, f"cannot be examined: {exc.strerror or exc}"))
        return
    if stat.S_ISLNK(st.st_mode):
        result.skipped.append((rel, "symbolic link (links are not followed)"))
        return
    if stat.S_ISDIR(st.st_mode):
        if rel in exclude:
            return
        if recursive:
            pending.append(rel)
        else:  # said, not silently passed over: its images wait for a recursive run
            result.skipped.append((rel, "a folder (its images are sorted by a recursive run, --recursive)"))
        return
    if not stat.S_ISREG(st.st_mode):
        result.skipped.append((rel, "not a regular file"))
        return
    suffix = os.path.splitext(entry.name)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        result.skipped.append((rel, f"not an image ({suffix or 'no extension'})"))
        return
    age = now - st.st_mtime
    # A write sets the time to now: one far in the future was set on purpose (an archive, a camera's clock),
    # not by a writer still at work, and waiting for it could mean waiting for years.
    if -FUTURE_TOLERANCE_S <= age < min_age_s:
        result.skipped.append((rel, f"modified {age:.1f}s ago, maybe still being written: left for the next run"))
        return
    result.images.append(rel)

