"""Finding a job's images in its input folder.

Images are recognised by extension (the formats the Inference service decodes); a file with an
image extension that turns out unreadable is the Inference service's to judge and ends in
_failed/. Other regular files are reported as skipped and stay where they are. Hidden files
(".name") and temporary files (partial downloads, editor swap files, Office lock files) are
ignored: they are usually still being written. Symbolic links are never followed.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
})
TEMPORARY_SUFFIXES = frozenset({
    ".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", ".swx", ".lock",
})


def is_hidden_or_temporary(name: str) -> bool:
    lower = name.lower()
    return (name.startswith((".", "~$")) or name.endswith("~")
            or os.path.splitext(lower)[1] in TEMPORARY_SUFFIXES)


@dataclass
class FolderScan:
    images: list[str] = field(default_factory=list)
    """Absolute paths as strings: a Path per image costs more than listing the folder."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Files left in place, with the reason."""
    ignored: int = 0
    """Hidden and temporary files (not reported one by one)."""


def scan_folder(folder: Path, recursive: bool, exclude: Iterable[Path] = (),
                min_age_s: float = 0.0) -> FolderScan:
    """The images under `folder` (sorted by path) and the files left alone.

    `exclude` are folders not descended into (the job's output folder when it lies inside the input).
    """
    result = FolderScan()
    excluded = {os.path.realpath(p) for p in exclude}
    now = time.time()
    pending = [folder]
    while pending:
        current = pending.pop()
        with os.scandir(current) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                _classify_entry(entry, result, pending, recursive, excluded, now, min_age_s)
    result.images.sort(key=lambda p: p.split(os.sep))  # the order Path sorts in: by component
    result.skipped.sort()
    return result


def _classify_entry(entry: os.DirEntry[str], result: FolderScan, pending: list[Path], recursive: bool,
                    excluded: set[str], now: float, min_age_s: float) -> None:
    if is_hidden_or_temporary(entry.name):
        result.ignored += 1
        return
    try:
        entry.path.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes (a legacy-encoded share): named in reports, never touched
        shown = os.fsencode(entry.path).decode("utf-8", "backslashreplace")
        result.skipped.append((Path(shown), "the file name is not valid UTF-8"))
        return
    if entry.is_symlink():
        result.skipped.append((Path(entry.path), "symbolic link (links are not followed)"))
        return
    if entry.is_dir(follow_symlinks=False):
        if recursive and os.path.realpath(entry.path) not in excluded:
            pending.append(Path(entry.path))
        return
    st = entry.stat(follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        result.skipped.append((Path(entry.path), "not a regular file"))
        return
    suffix = os.path.splitext(entry.name)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        result.skipped.append((Path(entry.path), f"not an image ({suffix or 'no extension'})"))
        return
    age = now - st.st_mtime
    if age < min_age_s:
        result.skipped.append((Path(entry.path),
                               f"modified {age:.1f}s ago, maybe still being written: left for the next run"))
        return
    result.images.append(entry.path)
