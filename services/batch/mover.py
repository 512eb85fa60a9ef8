"""Moving and copying sorted images without ever overwriting, losing or duplicating one.

Source and destination are names in folders held open (services/batch/tree.py): nothing here
resolves a path, and no call follows a link.

Same filesystem, move: `link(source, destination)` then `unlink(source)`. link() fails when the
destination exists, so a name taken at the last moment is never overwritten (rename() would
silently replace it). Other filesystem, or copy mode: copy to a hidden staging file in the
destination folder, fsync, link it to the destination name, remove the staging file, then (move)
remove the source. Filesystems without hard links fall back to an existence check and rename().
If the source cannot be removed (a read-only or sticky folder, a read-only mount), the new copy
is removed again: a file is never left in two places. A source name is unlinked only while it
still holds the file transferred: one re-uploaded over it meanwhile stays for the next run, and
one that changed while it was copied (still being written) stays where it is, its stale copy
removed. Copies keep the permission bits only, never setuid, setgid or sticky. Given the file that
was classified (FileIdentity), only that file, unchanged, is transferred: a name that came to hold
other bytes since the read (a re-upload, a rewrite) is left in place (NotTheFileClassified), so a
verdict never files a picture it was not about.

Every step leaves a state `complete()` can finish after a crash: given the recorded source,
destination and staging name it tells whether the transfer happened (and removes the leftovers),
must be redone, or whether the source vanished. It unlinks a source only when the destination is
the same inode, reached without links, and never files under a verdict a file that is not the one
classified.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import stat
from collections.abc import Container, Iterable
from concurrent.futures import ThreadPoolExecutor

from services.batch import failpoints
from services.batch.records import FileIdentity
from services.batch.tree import Entry, lstat_or_none, remove

UNCERTAIN_FOLDER = "_uncertain"
FAILED_FOLDER = "_failed"
NAME_MAX_BYTES = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._-]+")
FSYNC_THREADS = 16
COPY_BLOCK = 1024 * 1024
# errno values meaning "this filesystem has no hard links".
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


CHANGED_WHILE_COPIED = "it changed while it was being copied, maybe still being written"
NOT_CLASSIFIED = "it was replaced or changed after it was classified (a new upload?)"


class SourceNotRemovable(OSError):
    """The file reached its destination but its source could not be removed: the new copy was
    removed again and the file is where it was."""


class NotTheFileClassified(OSError):
    """The name holds other bytes than those classified: the file is left where it is, for the next run."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, NOT_CLASSIFIED)


class FileMover:
    """Moves or copies one file at a time; never overwrites."""

    def __init__(self, fsync: bool = True) -> None:
        self.fsync = fsync
        self._pool: ThreadPoolExecutor | None = None

    @staticmethod
    def staging(destination: Entry, tag: str) -> Entry:
        return Entry(destination.folder, f".batch-{tag}.part")

    def transfer(self, source: Entry, destination: Entry, copy: bool, tag: str,
                 classified: FileIdentity | None = None) -> None:
        """Move or copy `source` to `destination`; with `classified`, only while the source is that file,
        unchanged. Raises FileExistsError when the destination name is taken (pick another),
        NotTheFileClassified, SourceNotRemovable, OSError for the rest (source vanished, no space, changed
        while copied, ...)."""
        if copy:
            self._copy(source, destination, tag, classified)
            return
        try:
            os.link(source.name, destination.name, src_dir_fd=source.folder, dst_dir_fd=destination.folder,
                    follow_symlinks=False)  # a link swapped in is moved as a link, never followed
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                copied, placed = self._copy(source, destination, tag, classified)
                self.sync_folders([destination.folder])  # the copy is durable before the source goes
                self._remove_source(source, destination, placed, copied)
                return
            if exc.errno not in _NO_LINKS:
                raise
            if classified is not None and not _holds(source, classified):
                raise NotTheFileClassified() from None
            _rename_if_free(source, destination)
            return
        failpoints.reached("linked")
        placed = os.stat(destination.name, dir_fd=destination.folder, follow_symlinks=False)
        if classified is not None and not classified.unchanged_file(placed) and _same_inode_at(source, placed):
            # Another file (or new bytes) was linked: undone while its source name still holds it, so it stays
            # there. A name renamed over since is left (the linked file's only name may be the destination).
            _remove_if_same(destination, placed)
            raise NotTheFileClassified()
        self._remove_source(source, destination, placed)

    @staticmethod
    def _remove_source(source: Entry, destination: Entry, placed: os.stat_result,
                       copied: os.stat_result | None = None) -> None:
        """Unlink the source name now that its file is at the destination (`placed`: the destination's
        status), only while the name still holds that file: the same inode as `placed` (linked) or, copied,
        the inode `copied` describes, unchanged since the copy began. A name that came to hold another file
        (a re-upload renamed over it) is left for the next run; a file that changed while it was copied
        stays where it is and the stale copy goes (SourceNotRemovable). A window of one lstat() remains."""
        now = lstat_or_none(source)
        if now is None:
            return  # removed by someone else meanwhile: the file is at its destination
        if not _same_inode(now, copied or placed):
            return  # another file has the name now: the one transferred is at the destination
        if copied is not None and FileIdentity.of(copied).changed(now):
            _remove_if_same(destination, placed)
            raise SourceNotRemovable(errno.EAGAIN, CHANGED_WHILE_COPIED)
        try:
            os.unlink(source.name, dir_fd=source.folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _remove_if_same(destination, placed)  # never two copies: the file stays where it was
            raise SourceNotRemovable(exc.errno, exc.strerror) from exc

    def _copy(self, source: Entry, destination: Entry, tag: str,
              classified: FileIdentity | None) -> tuple[os.stat_result, os.stat_result]:
        """Copy through a staging file; returns the source's status when the copy began and the copy's.
        Raises OSError (EAGAIN) when the source changed while it was copied, NotTheFileClassified when it
        is not the file classified: no copy is left then."""
        staging = self.staging(destination, tag)
        remove(staging)  # a partial copy from an interrupted attempt
        src = os.open(source.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=source.folder)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):  # copying would block on a FIFO or read a device
                raise OSError(errno.EINVAL, "no longer a regular file")
            if classified is not None and not classified.unchanged_file(st):
                raise NotTheFileClassified()
            try:
                placed = self._write_staging(src, st, staging)
                failpoints.reached("staged")
                if FileIdentity.of(st).changed(os.fstat(src)):  # still being written: the copy would be cut or mixed
                    raise OSError(errno.EAGAIN, CHANGED_WHILE_COPIED)
                try:
                    os.link(staging.name, destination.name, src_dir_fd=staging.folder,
                            dst_dir_fd=destination.folder, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno not in _NO_LINKS:
                        raise
                    _rename_if_free(staging, destination)
                failpoints.reached("copied")
            finally:
                remove(staging)  # linked already, or a partial copy (no space left, ...)
        finally:
            os.close(src)
        return st, placed

    def _write_staging(self, src: int, st: os.stat_result, staging: Entry) -> os.stat_result:
        dst = os.open(staging.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=staging.folder)
        try:
            _copy_bytes(src, dst)
            # Permission bits only: the copy is the service's user's (root under cron), so an uploader's
            # setuid, setgid or sticky bit kept here would make a setuid-root file.
            os.fchmod(dst, stat.S_IMODE(st.st_mode) & 0o777)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            if self.fsync:
                os.fsync(dst)
            return os.fstat(dst)
        finally:
            os.close(dst)

    def complete(self, source: Entry, destination: Entry, copy: bool, tag: str,
                 classified: FileIdentity | None = None) -> Resume:
        """Finish or diagnose a transfer recorded as started (after a crash); `classified`: the file the
        verdict is about, None for rows of an earlier release. Raises NotTheFileClassified (nothing of it
        left at the destination, the source left in place), SourceNotRemovable (the destination's copy
        removed again) and OSError."""
        # A staging file is either already linked to the destination or an unfinished copy: drop it.
        remove(self.staging(destination, tag))
        at_source, at_destination = lstat_or_none(source), lstat_or_none(destination)
        if at_destination is None or not stat.S_ISREG(at_destination.st_mode):
            # Nothing there, or a link or folder someone put there: never followed, never ours.
            if at_source is not None:
                return Resume.REDO  # transfer() checks that it is the file classified
            return Resume.MISSING
        if at_source is None:
            return Resume.DONE
        if _same_inode(at_source, at_destination):  # linked, but the source was not removed yet
            if classified is not None and not classified.unchanged_file(at_destination):
                _remove_if_same(destination, at_destination)  # another file was linked: undone
                raise NotTheFileClassified()
            if not copy:
                self._remove_source(source, destination, at_destination)
            return Resume.DONE
        if classified is not None and not classified.unchanged_file(at_source):
            # The name holds other bytes now. A copy of the file classified at the destination is kept when
            # that file is gone from the source (the only copy: a re-upload renamed over it) and removed when
            # the source is that file, written since (stale); either way the source waits for the next run.
            if classified.copied_to(at_destination) and not classified.same_file(at_source):
                return Resume.DONE
            if classified.copied_to(at_destination):
                _remove_if_same(destination, at_destination)
            raise NotTheFileClassified()
        if stat.S_ISREG(at_source.st_mode) and _same_bytes(source, destination):
            if copy:
                return Resume.DONE
            # A finished copy across filesystems whose source was not removed yet: a different inode
            # is never proof enough to delete the source, so the copy goes and the move starts again.
            remove(destination)
            return Resume.REDO
        return Resume.REDO  # the name was taken by another file: transfer again under a new name

    def sync_folders(self, folders: Iterable[int]) -> None:
        """fsync folders (descriptors) so that the links and unlinks in them survive a power loss.
        In parallel: the filesystem commits concurrent fsyncs together."""
        if not self.fsync:
            return
        unique = list(set(folders))
        if len(unique) == 1:
            _fsync_folder(unique[0])
        elif unique:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync")
            list(self._pool.map(_fsync_folder, unique))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_if_same(entry: Entry, placed: os.stat_result) -> None:
    """Unlink the entry only while it is the file `placed` describes (a name taken by another file stays)."""
    now = lstat_or_none(entry)
    if now is not None and _same_inode(now, placed):
        remove(entry)


def _same_inode_at(entry: Entry, st: os.stat_result) -> bool:
    now = lstat_or_none(entry)
    return now is not None and _same_inode(now, st)


def _holds(entry: Entry, classified: FileIdentity) -> bool:
    """The name holds the file classified, unchanged."""
    now = lstat_or_none(entry)
    return now is not None and classified.unchanged_file(now)


def _rename_if_free(source: Entry, destination: Entry) -> None:
    # Only for filesystems without hard links: a tiny window remains between check and rename.
    if lstat_or_none(destination) is not None:
        raise FileExistsError(errno.EEXIST, "destination exists", destination.name)
    os.rename(source.name, destination.name, src_dir_fd=source.folder, dst_dir_fd=destination.folder)


def _copy_bytes(src: int, dst: int) -> None:
    while True:
        try:
            n = os.sendfile(dst, src, None, COPY_BLOCK)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            break  # no sendfile between these two: plain reads and writes
        if n == 0:
            return
    while block := os.read(src, COPY_BLOCK):
        view = memoryview(block)
        while view:
            view = view[os.write(dst, view):]


def _same_bytes(a: Entry, b: Entry) -> bool:
    fa = os.open(a.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=a.folder)
    try:
        fb = os.open(b.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=b.folder)
        try:
            if os.fstat(fa).st_size != os.fstat(fb).st_size:
                return False
            while True:
                block = os.read(fa, COPY_BLOCK)
                if block != os.read(fb, COPY_BLOCK):
                    return False
                if not block:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)


def _fsync_folder(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (SMB) refuse fsync on folders; the data itself was synced
