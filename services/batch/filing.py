"""Filing a job's images, synchronously, in worker threads (the runner drives it from the event
loop): reading them for classification; sorting the classified ones into their folders, one group
at a time: destinations recorded (write-ahead), files moved or copied, folders fsynced, rows
marked done, then the per-run log and CSV appended; and finishing, from their records, the
transfers a crash interrupted.

Files are reached only through folders opened from the data root down without following links
(tree.py), afresh for each read pass and each sorted group.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator

from services.batch import failpoints, reports
from services.batch.classifying import ImageAnswer
from services.batch.events import FileUpdate, JobEvents
from services.batch.mover import (
    FAILED_FOLDER,
    UNCERTAIN_FOLDER,
    FileMover,
    NotTheFileClassified,
    Resume,
    SourceNotRemovable,
    category_folder,
    unique_name,
)
from services.batch.paths import DataRoot
from services.batch.records import FileDone, FileIdentity, FilePlan, FileRecord, JobRecord, Outcome
from services.batch.reports import RunFiles, RunLog
from services.batch.store import DestinationTaken, JobStore
from services.batch.tree import FolderRefused, OpenFolders, basename, join, lstat_or_none, parent
from services.common import metrics
from services.common.config import BatchSettings

log = logging.getLogger(__name__)
MIB = 1024 * 1024
SYNC_BATCH = 64  # folders fsynced together at most: their duplicated descriptors are held until then


class Untouchable(str):
    """Why a file could not be read because of its folder (swapped for a link, gone): the file is
    left exactly where it is, not moved to _failed/."""


OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}
"""A transfer refused for want of space (a full disk, a quota): no other file will fare better."""

class JobFiling:
    """The per-file work of one job run. `job` is kept current by the runner (its counts, total and
    min_confidence change as the run goes)."""

    def __init__(self, settings: BatchSettings, store: JobStore, root: DataRoot, mover: FileMover, events: JobEvents,
                 max_image_bytes: int, job: JobRecord, files: RunFiles, run_log: RunLog) -> None:
        self.settings = settings
        self.store = store
        self.root = root
        self.mover = mover
        self.events = events
        self.max_image_bytes = max_image_bytes
        self.job = job
        self.files = files
        self.log = run_log
        self.copy = job.mode == "copy"
        self._folder_names: dict[str, set[str]] = {}
        self.recovery_failures: list[str] = []
        """Why interrupted transfers could not be finished (their files are left in place)."""
        self.sorted_count = 0
        """Images this run sorted (recorded as done)."""
        self._classified: dict[int, FileIdentity] = {}
        """The file each row's bytes were read from (by seq), until the row is planned."""
        self.out_of_space = ""
        """Why a destination's disk refused a transfer for want of space ("": none did): the job stops, and
        the images it has not sorted stay where they are for the next run."""

    # --- reading -------------------------------------------------------------------------------------

    def read(self, rows: list[FileRecord]) -> Iterator[tuple[list[FileRecord], list[bytes | str]]]:
        """The files' bytes (or why one cannot be read), in order, in chunks of at most batch_chunk_size images
        and batch_chunk_bytes bytes. Lazily: a chunk is read only when asked for (the runner asks once the
        last one is queued), so what a claim holds at once is bounded by the chunks in flight, not by the
        claim. Folders are opened afresh from the data root for each chunk, links are not followed and FIFOs
        not waited on: the tree may have changed since the scan."""
        limit = self.max_image_bytes
        chunk_bytes = min(self.settings.batch_chunk_bytes, limit)
        pending = collections.deque(rows)
        while pending:
            chunk_rows: list[FileRecord] = []
            chunk_data: list[bytes | str] = []
            size = 0
            with OpenFolders(self.root) as folders:  # closed before the chunk is handed over
                while pending and len(chunk_rows) < self.settings.batch_chunk_size:
                    data, identity = self._read_one(folders, pending[0].source, limit,
                                                    chunk_bytes - size if chunk_rows else None)
                    if data is None:
                        break  # it starts the next chunk
                    if identity is not None:
                        self._classified[pending[0].seq] = identity
                    chunk_rows.append(pending.popleft())
                    chunk_data.append(data)
                    size += len(data) if isinstance(data, bytes) else 0
            yield chunk_rows, chunk_data

    @staticmethod
    def _read_one(folders: OpenFolders, source: str, limit: int, room: int | None = None
                  ) -> tuple[bytes | str | None, FileIdentity | None]:
        """The file's bytes, or why it cannot be read; None, unread, when it is larger than `room`. With them,
        the file they were read from (None when it could not be opened): the verdict is about that file."""
        try:
            entry = folders.entry(source)
        except FolderRefused as exc:
            return Untouchable(f"cannot read: {exc.strerror}"), None
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.folder)
        except OSError as exc:
            return f"cannot read: {'it is a symbolic link' if exc.errno == errno.ELOOP else exc.strerror or exc}", None
        try:
            with open(fd, "rb") as f:
                st = os.fstat(fd)
                identity = FileIdentity.of(st)
                if not stat.S_ISREG(st.st_mode):
                    return "cannot read: not a regular file", identity
                if st.st_size > limit:
                    return f"too large to classify: {st.st_size / MIB:.1f} MiB (limit {limit / MIB:.1f} MiB)", identity
                if room is not None and st.st_size > room:
                    return None, None
                data = f.read(st.st_size + 1)
                if len(data) > st.st_size:  # still growing: read on, never past the limit
                    data += f.read(limit + 1 - len(data))
                if len(data) > limit:
                    return (f"too large to classify: {len(data) / MIB:.1f} MiB or more (limit {limit / MIB:.1f} MiB)",
                            identity)
                return data, identity
        except OSError as exc:
            return f"cannot read: {exc.strerror or exc}", None

    # --- sorting ------------------------------------------------------------------------------------

    def sort(self, group: list[tuple[list[FileRecord], list[bytes | str], list[ImageAnswer]]]
             ) -> tuple[JobRecord | None, list[FileUpdate]]:
        """Record, move, sync, mark done, then log and append the CSV. Returns what to publish."""
        start = time.perf_counter()
        decided: list[tuple[FileRecord, ImageAnswer]] = []
        untouchable: set[int] = set()
        for chunk_rows, chunk_data, verdicts in group:
            answers = iter(verdicts)
            for row, data in zip(chunk_rows, chunk_data, strict=True):
                decided.append((row, next(answers) if isinstance(data, bytes) else ImageAnswer(error=data)))
                if isinstance(data, Untouchable):
                    untouchable.add(row.seq)
        with OpenFolders(self.root) as folders:
            plans, in_place = self._plan(decided, untouchable, folders)
            failpoints.reached("planned")
            rows = {row.seq: row for row, _ in decided}
            moved = [self._transfer(p, rows[p.seq], folders) for p in plans.values() if p.seq not in in_place]
            self._sync_reachable(folders, self._folders_touched(decided, moved))
        failpoints.reached("moved")
        now = time.time()
        done = {d.seq: d for d in [*moved, *in_place.values()]}
        self.store.done(self.job.job_id, list(done.values()), now)
        self.sorted_count += len(done)
        failpoints.reached("recorded")
        updates = self._report(decided, plans, done, now)
        metrics.BATCH_SORT_DURATION.observe(time.perf_counter() - start)
        return (self.store.get(self.job.job_id) if updates else None), updates

    def _plan(self, decided: list[tuple[FileRecord, ImageAnswer]], untouchable: set[int], folders: OpenFolders
              ) -> tuple[dict[int, FilePlan], dict[int, FileDone]]:
        """Destinations for a group, recorded (write-ahead) before anything moves. Returns every image's
        plan, and the images that stay where they are (in their folder already, or not to be touched)."""
        for _ in range(5):
            reserved = self.store.reserved_destinations()  # names other jobs are moving files to right now
            chosen: dict[str, set[str]] = {}
            plans: dict[int, FilePlan] = {}
            in_place: dict[int, FileDone] = {}
            for row, v in decided:
                outcome, category, confidence = self._judge(v)
                folder = join(self.job.output_dir, FAILED_FOLDER if outcome == Outcome.FAILED else
                              UNCERTAIN_FOLDER if outcome == Outcome.UNCERTAIN else category_folder(category))
                error, existing = v.error, None
                if row.seq in untouchable:
                    outcome = Outcome.FAILED
                elif folder != parent(row.source):
                    try:
                        existing = self._names(folder, folders)
                    except FolderRefused as exc:
                        outcome, error = Outcome.FAILED, joined_reasons(v.error, f"cannot be moved: {exc.strerror}")
                if existing is None:
                    plans[row.seq] = FilePlan(row.seq, outcome, category, confidence, row.source, error)
                    in_place[row.seq] = FileDone(row.seq, outcome, row.source, error)
                    continue
                taken = chosen.get(folder)
                if taken is None:
                    taken = chosen[folder] = {basename(d) for d in reserved if parent(d) == folder}
                name = unique_name(basename(row.source), existing, taken)
                taken.add(name)
                plans[row.seq] = FilePlan(row.seq, outcome, category, confidence, join(folder, name), v.error,
                                          self._classified.get(row.seq))
            try:
                self.store.plan(self.job.job_id, [p for p in plans.values() if p.seq not in in_place])
            except DestinationTaken:
                continue  # another transfer reserved one of these names meanwhile: choose again
            for folder, names in chosen.items():
                self._folder_names[folder] |= names
            for seq in plans:
                self._classified.pop(seq, None)
            return plans, in_place
        raise RuntimeError("could not reserve destinations: other jobs keep taking the same names")

    def _names(self, folder: str, folders: OpenFolders, refresh: bool = False) -> set[str]:
        """Names present in a destination folder, which is opened (created if needed) for every group;
        listed once per run and kept up to date with the files this run adds. A name taken behind our
        back is still never overwritten: link() refuses it and the file is renamed. Raises FolderRefused."""
        fd = folders.folder(folder, create=True)
        names = self._folder_names.get(folder)
        if names is None or refresh:
            names = self._folder_names[folder] = set(os.listdir(fd))
        return names

    def _judge(self, v: ImageAnswer) -> tuple[Outcome, str, float | None]:
        if v.error:
            return Outcome.FAILED, "", None
        threshold = self.job.min_confidence
        uncertain = v.confidence < threshold if threshold is not None else v.uncertain
        return (Outcome.UNCERTAIN if uncertain else Outcome.SUCCESS), v.category, v.confidence

    def _transfer(self, plan: FilePlan, row: FileRecord, folders: OpenFolders) -> FileDone:
        """Carry out one recorded plan; a destination taken meanwhile gets the next free name."""
        destination = plan.destination
        tag = f"{self.job.job_id}-{plan.seq}"
        for _ in range(1000):
            try:
                self.mover.transfer(folders.entry(row.source), folders.entry(destination, create=True),
                                      self.copy, tag, plan.classified)
                return FileDone(plan.seq, plan.outcome, destination, plan.error)
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno in OUT_OF_SPACE and not self.out_of_space:
                    self.out_of_space = (f"the disk of {self.root.display(parent(destination))} is full "
                                         f"({exc.strerror}): the images not sorted yet stay where they are for "
                                         "the next run")
                return self._left_in_place(plan, row, destination, exc, folders)
            try:
                destination = self._replan(plan.seq, row.source, parent(destination), folders)
            except FolderRefused as exc:
                return self._left_in_place(plan, row, destination, exc, folders)
            failpoints.reached("replanned")
        raise RuntimeError(f"no free name for {row.source} in {parent(destination)}")

    def _replan(self, seq: int, source: str, folder: str, folders: OpenFolders) -> str:
        while True:
            existing = self._names(folder, folders, refresh=True)
            reserved = {basename(d) for d in self.store.reserved_destinations() if parent(d) == folder}
            candidate = join(folder, unique_name(basename(source), existing, reserved))
            try:
                self.store.replan(self.job.job_id, seq, candidate)
            except DestinationTaken:
                continue
            existing.add(basename(candidate))
            return candidate

    def _left_in_place(self, plan: FilePlan, row: FileRecord, destination: str, exc: OSError,
                       folders: OpenFolders) -> FileDone:
        with contextlib.suppress(FolderRefused):  # a refused folder was not touched: its file is still there
            if lstat_or_none(folders.entry(row.source)) is None:
                return FileDone(plan.seq, Outcome.FAILED, "", "the file disappeared before it could be moved")
        if isinstance(exc, FolderRefused):
            why = f"left untouched: {exc.strerror}"
        elif isinstance(exc, NotTheFileClassified):
            why = f"left for the next run: {exc.strerror}"
        elif isinstance(exc, SourceNotRemovable):
            why = f"cannot be moved: {exc.strerror} (its copy in {self.root.display(parent(destination))} was removed)"
        else:
            verb = "copy" if self.copy else "move"
            why = f"cannot {verb} it to {self.root.display(destination)}: {exc.strerror or exc}"
        if plan.outcome != Outcome.FAILED:
            why = f"classified as {plan.category}, but {why}"
        return FileDone(plan.seq, Outcome.FAILED, row.source, joined_reasons(plan.error, why))

    def recover_all(self) -> None:
        """Finish the transfers a crash (or an early stop) left recorded as moving."""
        with OpenFolders(self.root) as folders:
            self._recover(folders)

    def _recover(self, folders: OpenFolders) -> None:
        """Finish the transfers a crash interrupted, from their records. A transfer that cannot be finished
        leaves its file in place, is released for later jobs, and fails the job (recovery_failures)."""
        rows = self.store.in_flight(self.job.job_id)
        if not rows:
            return
        results = []
        for row in rows:
            try:
                results.append(self._resume(row, folders))
            except OSError as exc:
                self._recovery_failed(row, exc)
                results.append(FileDone(row.seq, Outcome.FAILED, row.source,
                                        f"could not finish the transfer interrupted by a crash: {exc.strerror or exc}"))
        touched = {parent(d.destination) for d in results if d.destination} | {parent(r.source) for r in rows}
        self._sync_reachable(folders, touched)
        self.store.done(self.job.job_id, results)
        self.log.line("Recovered %d transfers interrupted by a crash", len(results))

    def _resume(self, row: FileRecord, folders: OpenFolders) -> FileDone:
        """One interrupted transfer finished from its record. Raises OSError when it cannot be."""
        plan = FilePlan(row.seq, Outcome(row.outcome), row.category, row.confidence, row.destination, row.error,
                        FileIdentity.parse(row.classified))
        destination = folders.entry(row.destination, create=True)
        try:
            source = folders.entry(row.source)
        except FolderRefused as exc:
            # The source's folder was swapped: where its file went cannot be known. A copy already at the
            # destination is kept (removing it could lose the only one) and the job fails with the reason.
            at_destination = lstat_or_none(destination)
            if at_destination is None or not stat.S_ISREG(at_destination.st_mode):
                raise
            self._recovery_failed(row, exc)
            return FileDone(row.seq, plan.outcome, row.destination, joined_reasons(
                row.error, f"{exc.strerror}: a copy may remain where that folder went"))
        try:
            state = self.mover.complete(source, destination, self.copy, f"{self.job.job_id}-{row.seq}",
                                        plan.classified)
        except NotTheFileClassified as exc:
            return self._left_in_place(plan, row, row.destination, exc, folders)
        failpoints.reached("recovering")
        if state == Resume.DONE:
            return FileDone(row.seq, plan.outcome, row.destination, row.error)
        if state == Resume.MISSING:
            return FileDone(row.seq, Outcome.FAILED, "",
                            "the file disappeared: neither at its source nor at its destination")
        return self._transfer(plan, row, folders)

    def _recovery_failed(self, row: FileRecord, exc: OSError) -> None:
        reason = f"{reports.display_name(row.source, self.job.input_dir)}: {exc.strerror or exc}"
        self.recovery_failures.append(reason)
        log.error("Job %s: could not finish the transfer of %s", self.job.job_id, reports.printable(reason))

    def _folders_touched(self, decided: list[tuple[FileRecord, ImageAnswer]], moved: list[FileDone]) -> set[str]:
        touched = {parent(d.destination) for d in moved if d.destination}
        if not self.copy:
            touched |= {parent(row.source) for row, _ in decided}
        return touched

    def _sync_reachable(self, folders: OpenFolders, rels: Iterable[str]) -> None:
        """fsync the folders that can still be reached (the others were not touched), SYNC_BATCH at a time.
        Each descriptor is duplicated as it is collected: OpenFolders closes one it returned once MAX_OPEN
        other folders were opened (and the number is reused), and a group can touch more folders than that."""
        if not self.mover.fsync:
            return
        batch: list[int] = []
        try:
            for rel in rels:
                with contextlib.suppress(FolderRefused):
                    batch.append(os.dup(folders.folder(rel)))
                if len(batch) >= SYNC_BATCH:
                    self.mover.sync_folders(batch)
                    while batch:
                        os.close(batch.pop())
            self.mover.sync_folders(batch)
        finally:
            for fd in batch:
                os.close(fd)

    def _report(self, decided: list[tuple[FileRecord, ImageAnswer]], plans: dict[int, FilePlan],
                done: dict[int, FileDone], now: float) -> list[FileUpdate]:
        """The per-run log and the CSV for one sorted group; the file updates when someone watches."""
        watched = self.events.watched(self.job.job_id)
        entries: list[reports.LogEntry] = []
        rows: list[list[str]] = []
        updates: list[FileUpdate] = []
        when = reports.local_iso(now)
        counts: collections.Counter[str] = collections.Counter()
        for row, _ in decided:
            d, p = done[row.seq], plans[row.seq]
            name = reports.display_name(row.source, self.job.input_dir)
            confidence = p.confidence if d.outcome != Outcome.FAILED else None
            entries.append(reports.LogEntry(row.seq, name, d.outcome, p.category, confidence, d.error,
                                            self._where(row, d)))
            rows.append(reports.csv_row(name, d.outcome, p.category, confidence, when))
            counts[d.outcome.value] += 1
            if watched:
                updates.append(FileUpdate(name, p.category, confidence or 0.0, d.outcome.value, d.destination,
                                          d.error))
        self.log.file_results(entries, self.job.total, self.job.min_confidence)
        try:
            reports.append_csv(self.files.csv, rows, self.settings.batch_csv_escape_formulas)
        except OSError as exc:  # the CSV is written again from the database when the job ends
            log.warning("Job %s: could not append to %s: %s", self.job.job_id, self.files.csv, exc)
        for outcome, n in counts.items():
            metrics.BATCH_FILES.labels(outcome).inc(n)
        return updates

    def _where(self, row: FileRecord, d: FileDone) -> str:
        """The log's last line for a file: where it went."""
        if not d.destination:
            return "✗ Gone: the file is no longer there"
        shown = self.root.display(d.destination)
        if d.destination != row.source:
            return f"✓ {'Copied' if self.copy else 'Moved'} to: {shown}"
        return f"✗ Left in place: {shown}" if d.error else f"✓ Already in: {shown}"

    def recovery_error(self) -> str:
        """Why the job fails when some interrupted transfers could not be finished."""
        n = len(self.recovery_failures)
        return (f"could not finish {n} transfer{'s' if n > 1 else ''} interrupted by a crash (left in place): "
                f"{self.recovery_failures[0]}")


def joined_reasons(first: str, second: str) -> str:
    return f"{first}; {second}" if first else second
