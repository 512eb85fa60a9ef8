"""The pieces that decide where files go, on a real filesystem and a real jobs database (SQLite, and
PostgreSQL where installed): data-root confinement, scanning, collision-free names, every state a
crash can leave a transfer in, the jobs database's guarantees (claims and takeovers between
workers too), and schedules."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from services.batch.mover import FileMover, Resume, category_folder, unique_name
from services.batch.paths import DataRoot, FolderMissing, PathRefused
from services.batch.postgres_store import PostgresJobStore, lock_key
from services.batch.records import FileDone, FilePlan, JobSpec, JobState, Outcome
from services.batch.scanner import scan_folder
from services.batch.schedule import Schedule
from services.batch.sqlite_store import SqliteJobStore
from services.batch.store import DestinationTaken, JobClosed, JobStore, KeyReused, StoreUnavailable
from services.batch.tree import MAX_OPEN, Entry, FolderRefused, OpenFolders
from tests.postgres import PASSWORD, PostgresServer
from tests.support import LABELS, changed_command


def test_data_root_refuses_every_way_out(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "inbox" / "deep").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "out_link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "in_link").symlink_to(root / "inbox", target_is_directory=True)
    dr = DataRoot(root)
    assert dr.folder("inbox", "input_dir") == (root / "inbox").resolve()
    assert dr.folder(str(root / "inbox" / "deep"), "input_dir") == (root / "inbox" / "deep").resolve()
    assert dr.folder("inbox/deep/..", "input_dir") == (root / "inbox").resolve()  # stays inside: fine
    assert dr.folder("in_link", "input_dir") == (root / "inbox").resolve()  # a link that stays inside
    for raw in ("..", "../outside", "inbox/../../outside", str(tmp_path / "outside"), "out_link", "/etc"):
        with pytest.raises(PathRefused, match="outside the data root"):
            dr.folder(raw, "input_dir")
    with pytest.raises(PathRefused, match="NUL"):
        dr.resolve("inbox\x00", "input_dir")
    with pytest.raises(FolderMissing, match="does not exist"):
        dr.folder("nothing/here", "input_dir")
    assert dr.relative((root / "inbox" / "deep").resolve()) == "inbox/deep"
    assert dr.relative((root / "inbox" / "deep" / "a.png").resolve()) == "inbox/deep/a.png"
    assert dr.display("inbox/deep") == f"{root}/inbox/deep"


def test_category_folders_are_safe_names() -> None:
    names = [category_folder(label) for label in LABELS]
    assert names[0] == "T-shirt_top" and "Ankle boot" in names
    assert len(set(names)) == len(LABELS) and all("/" not in n for n in names)
    assert category_folder("../../etc") == "etc"
    assert category_folder("_failed") == "failed" and category_folder(".hidden") == "hidden"
    assert category_folder("Sac à main / Tasche") == "Sac _ main _ Tasche"
    assert category_folder("///") == "unnamed"


def test_unique_name_never_reuses_a_taken_name() -> None:
    assert unique_name("a.png", set()) == "a.png"
    assert unique_name("a.png", {"a.png"}, {"a_1.png"}) == "a_2.png"
    assert unique_name("noext", {"noext"}) == "noext_1"
    long = "x" * 255 + ".png"
    assert len(unique_name(long[-255:], {long[-255:]}).encode()) <= 255


def test_scan_finds_images_reports_other_files_and_ignores_hidden_and_temporary(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.PNG", "a.jpg", "c.webp", "notes.txt", "README", ".hidden.png", "x.png.part", "y.crdownload",
                 "~$doc.png", "backup.png~", "sub/d.png"):
        (folder / name).write_bytes(b"data")
    (folder / "link.png").symlink_to(folder / "a.jpg")
    (folder / "dirlink").symlink_to(folder / "sub", target_is_directory=True)
    os.mkfifo(folder / "pipe.png")
    with OpenFolders(DataRoot(tmp_path)) as folders:
        flat = scan_folder(folders, "in", recursive=False)
        assert flat.images == ["in/a.jpg", "in/b.PNG", "in/c.webp"]
        assert dict(flat.skipped) == {
            "in/notes.txt": "not an image (.txt)", "in/README": "not an image (no extension)",
            "in/link.png": "symbolic link (links are not followed)", "in/pipe.png": "not a regular file",
            "in/dirlink": "symbolic link (links are not followed)",
            "in/sub": "a folder (its images are sorted by a recursive run, --recursive)"}
        assert flat.ignored == 5
        deep = scan_folder(folders, "in", recursive=True, exclude={"in/sub"})
        assert deep.images == ["in/a.jpg", "in/b.PNG", "in/c.webp"]
        assert scan_folder(folders, "in", recursive=True).images == [
            "in/a.jpg", "in/b.PNG", "in/c.webp", "in/sub/d.png"]
        (folder / os.fsdecode(b"caf\xe9.png")).write_bytes(b"latin-1 name")
        odd = dict(scan_folder(folders, "in", recursive=False).skipped)
        assert odd["in/caf\\xe9.png"] == "the file name is not valid UTF-8"
        (folder / os.fsdecode(b"caf\xe9.png")).unlink()
        young = scan_folder(folders, "in", recursive=False, min_age_s=3600)
        assert not young.images and "still being written" in dict(young.skipped)["in/a.jpg"]
        # A time set far ahead (an archive's, a wrong camera clock) is no write in progress: sorted now.
        os.utime(folder / "b.PNG", (time.time() + 86400, time.time() + 86400))
        assert scan_folder(folders, "in", recursive=False, min_age_s=3600).images == ["in/b.PNG"]
        assert "in/sub" not in dict(scan_folder(folders, "in", recursive=False, exclude={"in/sub"}).skipped)


def entry(path: Path) -> Entry:
    """A file as the mover takes it: its folder opened (closed at exit by the test's process end)."""
    return Entry(os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY), path.name)


def test_folders_are_opened_without_following_links(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "inbox").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "file").write_bytes(b"x")
    with OpenFolders(DataRoot(root)) as folders:
        assert os.fstat(folders.folder("inbox")).st_ino == (root / "inbox").stat().st_ino
        folders.folder("new/deeper", create=True)
        assert (root / "new" / "deeper").is_dir()
        for rel, why in (("out", "is now a symbolic link"), ("out/Bag", "is now a symbolic link"),
                         ("file", "is no longer a folder"), ("gone", "does not exist"), ("inbox/..", "not a plain")):
            with pytest.raises(FolderRefused, match=why):
                folders.folder(rel, create=rel == "out/Bag")
        assert not any((tmp_path / "elsewhere").iterdir())  # nothing created through the link


def test_open_folders_hold_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    """A catalog with a folder per product: thousands of folders in one sorted group or scan."""
    for i in range(1500):
        (tmp_path / "inbox" / f"sku{i:04d}").mkdir(parents=True)
        (tmp_path / "inbox" / f"sku{i:04d}" / "photo.png").write_bytes(b"x")
    def held() -> int:  # this process's descriptors of folders under tmp_path
        targets = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, closed by now
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        return sum(1 for target in targets if target.startswith(str(tmp_path)))

    with OpenFolders(DataRoot(tmp_path)) as folders:
        for i in range(1500):
            entry = folders.entry(f"inbox/sku{i:04d}/photo.png")
            assert os.stat(entry.name, dir_fd=entry.folder).st_size == 1  # the descriptor is the right folder
        assert 100 < held() <= MAX_OPEN
        scan = scan_folder(folders, "inbox", recursive=True)
        assert len(scan.images) == 1500 and not scan.skipped
    assert held() == 0


def test_move_and_copy_never_overwrite(tmp_path: Path) -> None:
    mover = FileMover(fsync=True)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a.png").write_bytes(b"A")
    (dst / "a.png").write_bytes(b"other")
    with pytest.raises(FileExistsError):
        mover.transfer(entry(src / "a.png"), entry(dst / "a.png"), copy=False, tag="t1")
    assert (src / "a.png").read_bytes() == b"A" and (dst / "a.png").read_bytes() == b"other"
    mover.transfer(entry(src / "a.png"), entry(dst / "a_1.png"), copy=True, tag="t1")
    assert (src / "a.png").read_bytes() == (dst / "a_1.png").read_bytes() == b"A"
    mover.transfer(entry(src / "a.png"), entry(dst / "a_2.png"), copy=False, tag="t2")
    assert not (src / "a.png").exists() and (dst / "a_2.png").read_bytes() == b"A"
    assert sorted(p.name for p in dst.iterdir()) == ["a.png", "a_1.png", "a_2.png"]  # no staging left


def test_move_across_filesystems_copies_syncs_then_removes(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the temporary folder")
    src = Path(tempfile.mkdtemp(dir=other))
    try:
        (src / "a.png").write_bytes(b"A" * 5000)
        os.utime(src / "a.png", (1_600_000_000, 1_600_000_000))
        FileMover(fsync=True).transfer(entry(src / "a.png"), entry(tmp_path / "a.png"), copy=False, tag="x")
        assert not (src / "a.png").exists() and (tmp_path / "a.png").read_bytes() == b"A" * 5000
        assert (tmp_path / "a.png").stat().st_mtime == 1_600_000_000  # metadata kept
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]  # no staging file left
    finally:
        shutil.rmtree(src)


@pytest.mark.parametrize("copy", [False, True])
def test_complete_finishes_every_interrupted_transfer(tmp_path: Path, copy: bool) -> None:
    """Each state a crash can leave between the write-ahead record and the done record."""
    mover = FileMover(fsync=False)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()

    def case(name: str, at_source: bool, at_destination: bytes | None, linked: bool = False,
             staging: bytes | None = None) -> tuple[Path, Path]:
        s, d = src / name, dst / name
        if at_source:
            s.write_bytes(b"image " + name.encode())
        if linked:
            os.link(s, d)
        elif at_destination is not None:
            d.write_bytes(at_destination)
        if staging is not None:
            (dst / f".batch-{name}.part").write_bytes(staging)
        return s, d

    def complete(s: Path, d: Path, tag: str) -> Resume:
        return mover.complete(entry(s), entry(d), copy, tag)

    body = {n: b"image " + n.encode() for n in ("p", "q", "r", "s", "t", "u", "v", "w")}
    s, d = case("p", True, None, staging=b"image")  # crashed while copying: partial staging file
    assert complete(s, d, "p") == Resume.REDO and not (dst / ".batch-p.part").exists()
    s, d = case("q", True, None, linked=not copy, staging=None)  # moved by link, source not yet removed
    if not copy:
        assert complete(s, d, "q") == Resume.DONE and not s.exists() and d.read_bytes() == body["q"]
    s, d = case("r", True, body["r"])  # copied completely (other filesystem or copy mode), source still there
    if copy:
        assert complete(s, d, "r") == Resume.DONE and d.read_bytes() == s.read_bytes() == body["r"]
    else:  # another inode is no proof: the source stays, the copy goes, the move starts again
        assert complete(s, d, "r") == Resume.REDO and s.read_bytes() == body["r"] and not d.exists()
    s, d = case("s", False, body["s"])  # finished
    assert complete(s, d, "s") == Resume.DONE
    s, d = case("t", True, b"someone else's file")  # the name was taken meanwhile: ours must not be lost
    assert complete(s, d, "t") == Resume.REDO and s.read_bytes() == body["t"]
    assert d.read_bytes() == b"someone else's file"
    s, d = case("u", False, None)  # gone from both places (removed by someone else)
    assert complete(s, d, "u") == Resume.MISSING
    # A link planted at the recorded destination, back to the source: never followed, the source stays.
    s, d = case("v", True, None)
    d.symlink_to(s)
    assert complete(s, d, "v") == Resume.REDO and s.read_bytes() == body["v"] and d.is_symlink()
    s, d = case("w", False, None)  # the same with the source gone: not ours, nothing recorded as moved there
    d.symlink_to(tmp_path / "elsewhere.png")
    assert complete(s, d, "w") == Resume.MISSING and d.is_symlink()


@pytest.fixture
def open_store(tmp_path: Path, jobs_database: str | None) -> Iterator[Callable[[], JobStore]]:
    """Opens the jobs database of the test's store, as one more worker (process) each time."""
    opened: list[JobStore] = []

    def make() -> JobStore:
        store: JobStore = PostgresJobStore(jobs_database) if jobs_database else SqliteJobStore(tmp_path / "jobs.db")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def test_store_keeps_jobs_apart_and_write_ahead_records(open_store: Callable[[], JobStore]) -> None:
    store = open_store()
    a = store.create(JobSpec("inbox", "out"), "api")
    b = store.create(JobSpec("inbox", "out"), "cli")
    keyed = store.create(JobSpec("x", "out", idempotency_key="k"), "api")
    assert keyed.job_id == store.create(JobSpec("x", "out", idempotency_key="k"), "api").job_id
    with pytest.raises(KeyReused, match="idempotency key 'k' already names job"):
        store.create(JobSpec("y", "out", idempotency_key="k"), "api")
    a = store.start(a.job_id, now=datetime(2025, 10, 7, 2, 0, 0).timestamp())
    b = store.start(b.job_id, now=datetime(2025, 10, 7, 2, 0, 0).timestamp())
    assert (a.stamp, b.stamp) == ("20251007_020000", "20251007_020001")  # files of two runs never collide
    store.add_files(a.job_id, ["inbox/1.png", "inbox/2.png"], [("inbox/n.txt", "not an image (.txt)")])
    b = store.add_files(b.job_id, ["inbox/2.png", "inbox/3.png"], [])
    assert b.total == 1 and b.skipped == 1  # 2.png belongs to the unfinished job a
    skipped = store.files(b.job_id, (Outcome.SKIPPED,))
    assert [(f.source, f.error) for f in skipped] == [("inbox/2.png", f"being processed by job {a.job_id}")]
    assert [f.source for f in store.claim_files(a.job_id, 10)] == ["inbox/1.png", "inbox/2.png"]
    assert [f.source for f in store.claim_files(b.job_id, 10)] == ["inbox/3.png"]
    store.plan(a.job_id, [FilePlan(1, Outcome.SUCCESS, "Bag", 0.9, "out/Bag/1.png")])
    with pytest.raises(DestinationTaken):  # one destination, one transfer in flight
        store.plan(b.job_id, [FilePlan(1, Outcome.SUCCESS, "Bag", 0.9, "out/Bag/1.png")])
    assert [r.destination for r in store.in_flight(a.job_id)] == ["out/Bag/1.png"]
    store.done(a.job_id, [FileDone(1, Outcome.SUCCESS, "out/Bag/1.png")])
    store.set_ending(a.job_id, JobState.CANCELLED, "cancelled on request")
    with pytest.raises(JobClosed):  # its end is recorded: nothing more is planned, by anyone
        store.plan(a.job_id, [FilePlan(2, Outcome.SUCCESS, "Bag", 0.9, "out/Bag/2.png")])
    assert store.claim_files(a.job_id, 10) == [] and store.unfinished_files(a.job_id) == 1
    assert store.release_pending(a.job_id) == 1
    finished = store.finish(a.job_id, JobState.CANCELLED)
    assert (finished.counts.successful, finished.counts.unprocessed, finished.counts.categories) == (1, 1, {"Bag": 1})
    assert store.unfinished_ids() == [b.job_id, keyed.job_id]
    assert finished.finished_at is not None
    assert store.prune(before=finished.finished_at + 1) == 3  # per-file rows go, totals stay
    assert store.get(a.job_id).counts.successful == 1
    assert store.get(a.job_id[:8]).job_id == a.job_id
    assert store.get(a.job_id[:8].upper()).job_id == a.job_id


def test_workers_claim_different_files_and_take_over_those_of_one_that_died(
        open_store: Callable[[], JobStore]) -> None:
    runner, helper = open_store(), open_store()
    assert runner.worker != helper.worker
    job_id = runner.create(JobSpec("inbox", "out"), "api").job_id
    lock = runner.lock_job(job_id)
    assert lock is not None and helper.lock_job(job_id) is None and runner.lock_job(job_id) is None
    runner.start(job_id)
    runner.add_files(job_id, [f"inbox/{i:02d}.png" for i in range(1, 11)], [])
    assert [f.seq for f in runner.claim_files(job_id, 3)] == [1, 2, 3]
    assert [f.seq for f in helper.claim_files(job_id, 3)] == [4, 5, 6]
    with pytest.raises(RuntimeError, match="not claimed by this worker"):  # never another worker's row
        runner.plan(job_id, [FilePlan(4, Outcome.SUCCESS, "Bag", 0.9, "out/Bag/04.png")])
    helper.plan(job_id, [FilePlan(4, Outcome.SUCCESS, "Bag", 0.9, "out/Bag/04.png")])
    assert runner.in_flight(job_id) == [] and [f.seq for f in helper.in_flight(job_id)] == [4]
    assert runner.moving_elsewhere(job_id) == 1 and helper.moving_elsewhere(job_id) == 0
    if isinstance(runner, PostgresJobStore):
        assert runner.take_over(job_id) == 0  # the helper is alive: its files stay its own
    helper.close()  # the helper's process dies: its session, and with it its worker's lock, ends
    deadline = time.monotonic() + 10
    while not (taken := runner.take_over(job_id)):
        assert time.monotonic() < deadline, "the dead worker's files were never taken over"
        time.sleep(0.05)
    assert taken == 3  # 4 is recorded as moving: the runner's to finish; 5 and 6 are unclaimed again
    assert [(f.seq, f.destination) for f in runner.in_flight(job_id)] == [(4, "out/Bag/04.png")]
    assert runner.moving_elsewhere(job_id) == 0
    assert [f.seq for f in runner.claim_files(job_id, 100)] == [5, 6, 7, 8, 9, 10]
    runner.done(job_id, [FileDone(4, Outcome.SUCCESS, "out/Bag/04.png")])
    assert runner.unfinished_files(job_id) == 9
    lock.release()
    assert runner.lock_job(job_id) is not None


def test_runnable_jobs_are_the_unfinished_ones_whose_lock_no_process_holds(
        postgres: PostgresServer, postgres_database: str) -> None:
    """What a helping replica leaves off for (PostgreSQL: read from pg_locks, nothing taken)."""
    runner, other = PostgresJobStore(postgres_database), PostgresJobStore(postgres_database)
    elsewhere = PostgresJobStore(postgres.create_database())  # another database on the same server
    try:
        ids = [runner.create(JobSpec(f"inbox{i}", "out"), "api", job_id=f"job{i:02d}").job_id for i in range(12)]
        assert {lock_key(job_id) < 0 for job_id in ids[:6]} == {True, False}  # keys of either sign held
        held = [lock for job_id in ids[:6] if (lock := runner.lock_job(job_id)) is not None]
        assert len(held) == 6
        assert all(elsewhere.lock_job(job_id) is not None for job_id in ids[6:])  # not this database's locks
        assert other.runnable(ids) == runner.runnable(ids) == set(ids[6:])
        runner.finish(ids[6], JobState.CANCELLED)  # ended: nobody's to run
        assert other.runnable(ids) == set(ids[7:])
        held[0].release()
        assert other.runnable(ids) == {ids[0], *ids[7:]}
        runner.close()  # its process dies: so do its locks, once the server has ended its session
        deadline = time.monotonic() + 10
        while other.runnable(ids) != {*ids[:6], *ids[7:]}:
            assert time.monotonic() < deadline, other.runnable(ids)
            time.sleep(0.05)
        assert other.runnable([]) == set()
    finally:
        for store in (runner, other, elsewhere):
            store.close()


def test_workers_claiming_at_the_same_time_never_get_the_same_file(open_store: Callable[[], JobStore]) -> None:
    workers = [open_store() for _ in range(4)]
    job_id = workers[0].create(JobSpec("inbox", "out"), "api").job_id
    workers[0].start(job_id)
    workers[0].add_files(job_id, [f"inbox/{i:04d}.png" for i in range(1, 601)], [])
    claimed: dict[str, list[int]] = {w.worker: [] for w in workers}
    start = threading.Barrier(len(workers))

    def claim(store: JobStore) -> None:
        start.wait()
        while rows := store.claim_files(job_id, 7):
            claimed[store.worker] += [r.seq for r in rows]

    threads = [threading.Thread(target=claim, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [seq for seqs in claimed.values() for seq in seqs]
    assert sorted(every) == list(range(1, 601))  # each file claimed exactly once
    if isinstance(workers[0], PostgresJobStore):
        assert all(claimed.values()), {w: len(s) for w, s in claimed.items()}  # shared, not queued behind one


def test_replicas_starting_together_create_the_schema_once(postgres_database: str) -> None:
    stores: list[PostgresJobStore] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            stores.append(PostgresJobStore(postgres_database))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len({s.worker for s in stores}) == 4, errors
        again = PostgresJobStore(postgres_database)  # a restart finds the schema as it is
        stores.append(again)
        with psycopg.connect(postgres_database) as conn:
            assert conn.execute("SELECT version FROM batch_schema").fetchall() == [(1,)]
    finally:
        for store in stores:
            store.close()


def test_a_lost_connection_stops_the_runs_then_connects_again_as_a_new_worker(postgres_database: str) -> None:
    store = PostgresJobStore(postgres_database)
    other = PostgresJobStore(postgres_database)
    try:
        job_id = store.create(JobSpec("inbox", "out"), "api").job_id
        lock = store.lock_job(job_id)
        assert lock is not None and other.lock_job(job_id) is None
        first = store.worker
        with psycopg.connect(postgres_database, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name ="
                          " 'fashion-batch' AND pid != pg_backend_pid() AND backend_xid IS NULL"
                          " AND pid = (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = %s"
                          " AND classid = %s)", (int(first), 0x62617401))
        with pytest.raises(StoreUnavailable, match="lost the connection to the jobs database"):
            store.get(job_id)
        with pytest.raises(StoreUnavailable):  # its job runs must stop first: their lock is gone
            store.unfinished_ids()
        deadline = time.monotonic() + 10
        while (taken := other.lock_job(job_id)) is None:  # the job is free for another replica at once
            assert time.monotonic() < deadline
            time.sleep(0.05)
        taken.release()
        lock.release()  # the run stopped
        assert store.unfinished_ids() == [job_id] and store.worker != first  # back, as a new worker
    finally:
        store.close()
        other.close()


def test_an_unusable_database_is_named_without_its_password(postgres_database: str) -> None:
    wrong = postgres_database.replace(PASSWORD, "not-the-password")
    with pytest.raises(StoreUnavailable) as refused:
        PostgresJobStore(wrong)
    message = str(refused.value)
    assert message.startswith(f"cannot connect to the jobs database fashion@127.0.0.1:{wrong.split(':')[3]}")
    assert "password authentication failed" in message and "not-the-password" not in message


def test_schedules_cron_and_interval() -> None:
    assert Schedule.parse("") is None and Schedule.parse("   ") is None
    nightly = Schedule.parse("0 2 * * *")
    assert nightly is not None and nightly.next_after(datetime(2025, 10, 7, 2, 0, 0)) == datetime(2025, 10, 8, 2)
    assert nightly.next_after(datetime(2025, 10, 7, 1, 59, 59)) == datetime(2025, 10, 7, 2)
    for text, seconds in (("every 30m", 1800), ("@every 2h", 7200), ("90s", 90), ("45", 45), ("1d", 86400)):
        s = Schedule.parse(text)
        assert s is not None and s.interval_s == seconds, text
    for bad in ("every day", "0 2 * *", "61 * * * *", "0.5s"):
        with pytest.raises(ValueError, match="batch schedule"):
            Schedule.parse(bad)


def test_only_the_services_user_can_hold_a_job_lock(tmp_path: Path) -> None:
    """flock needs only read access: a job lock file others may read (0644, as before) let any local user hold
    it and so keep the job from running. Lock files are 0600 now, an earlier release's narrowed when taken."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # a folder another user can reach (tmp_path's parents cannot)
    try:
        shared.chmod(0o755)
        store = SqliteJobStore(shared / "db" / "jobs.db")
        (shared / "db").chmod(0o755)
        (shared / "db" / "locks").mkdir(mode=0o755)
        (shared / "db" / "locks" / "older.lock").touch(mode=0o644)
        try:
            for job_id in ("newjob", "older"):
                lock = store.lock_job(job_id)
                assert lock is not None
                lock_file = shared / "db" / "locks" / f"{job_id}.lock"
                assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600
                lock.release()
                other_user = subprocess.run(changed_command(  # nobody, holding the lock of a job that is not running
                    ["/usr/bin/python3", "-c", "import fcntl, sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX)",
                     str(lock_file)], user=(65534, 65534)), capture_output=True, text=True, timeout=30)
                assert other_user.returncode == 1 and "PermissionError" in other_user.stderr, other_user
        finally:
            store.close()
    finally:
        shutil.rmtree(shared)
