"""Retention of per-run files (batch logs, CSV results and JSON summaries, monitoring reports): the
files a process writes for each run, matched by their names, are deleted once they are older than
FASHION_RETENTION_DAYS. Rotating service logs (api.log, ...) are not per-run files: rotation bounds them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
DAY_S = 86400.0


def prune_files(folder: Path, patterns: Iterable[str], older_than_days: float, now: float | None = None,
                shown: str = "") -> int:
    """Delete the files of `folder` matching `patterns` whose last modification is more than `older_than_days`
    ago (0 keeps everything); returns how many were deleted. A file that cannot be deleted is logged and
    left for the next sweep. The log names the folder `shown` when given (a descriptor's /proc path is not
    what its readers know it by)."""
    if older_than_days <= 0 or not folder.is_dir():
        return 0
    before = (time.time() if now is None else now) - older_than_days * DAY_S
    removed = 0
    for pattern in patterns:
        for path in folder.glob(pattern):
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_mtime < before:
                    path.unlink()
                    removed += 1
            except OSError as exc:  # gone meanwhile, or not ours to delete
                log.warning("Could not delete the old file %s: %s", path, exc)
    if removed:
        log.info("Deleted %d files older than %g days from %s", removed, older_than_days, shown or folder)
    return removed
