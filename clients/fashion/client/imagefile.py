"""Reading an image file to send: only regular files, and never past what one call can carry."""

from __future__ import annotations

import os
import stat
from pathlib import Path

MIB = 1024 * 1024
MESSAGE_OVERHEAD = 64 * 1024  # room for the protobuf framing around one call's image bytes


class ImageFileError(OSError):
    """A path that is no image file to send: `kind` says which, FOLDER (a caller may suggest naming its
    images instead), NOT_REGULAR (a FIFO, device or socket) or TOO_LARGE (over the limit); `reason` says
    it in words."""

    FOLDER = "folder"
    NOT_REGULAR = "not a regular file"
    TOO_LARGE = "too large"

    def __init__(self, path: str | Path, reason: str, kind: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason
        self.kind = kind

    @property
    def folder(self) -> bool:
        return self.kind == self.FOLDER


def read_image_file(path: str | Path, limit: int) -> bytes:
    """The file's bytes. A FIFO would block the caller and /dev/zero fill its memory, so only regular files
    are read, and never past `limit` bytes (a file still growing is read up to it). Raises ImageFileError
    for what is not a regular file or is over `limit`, OSError when it cannot be opened or read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO opens at once
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageFileError(path, "a folder", ImageFileError.FOLDER)
        if not stat.S_ISREG(st.st_mode):
            raise ImageFileError(path, "not a regular file", ImageFileError.NOT_REGULAR)
        if st.st_size > limit:
            raise ImageFileError(path, f"too large to classify: {st.st_size / MIB:.1f} MiB "
                                       f"(limit {limit / MIB:.1f} MiB)", ImageFileError.TOO_LARGE)
        with open(fd, "rb", closefd=False) as f:
            data = f.read(st.st_size + 1)
            if len(data) > st.st_size:  # still growing: read on, never past the limit
                data += f.read(limit + 1 - len(data))
        if len(data) > limit:
            raise ImageFileError(path, f"too large to classify: {len(data) / MIB:.1f} MiB or more "
                                       f"(limit {limit / MIB:.1f} MiB)", ImageFileError.TOO_LARGE)
        return data
    finally:
        os.close(fd)


__all__ = ["MESSAGE_OVERHEAD", "ImageFileError", "read_image_file"]
