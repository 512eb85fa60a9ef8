"""Limits of one claim of `fashion batch run`, as a user (or a CronJob with a memory limit) runs it: the
memory held grows with FASHION_BATCH_CHUNK_BYTES, not with the claim; every folder that received or
lost a file is fsynced however many folders a sorted group touches; a folder nested deeper than
Python's recursion limit is handled like any other."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.batch.conftest import BatchHome, files_under, read_csv, write_images
from tests.images import encode, fashion_images
from tests.support import ServiceProcess

pytestmark = pytest.mark.timeout(300)
MIB = 1024 * 1024


# Runs argv[2:] and writes its peak resident memory (bytes) to argv[1]. From this small process: a child's
# ru_maxrss counts the memory of whoever forked it, and pytest holds a few hundred MiB.
PEAK_RSS = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))
if os.WIFSIGNALED(status):  # ends the same way (a failpoint's SIGKILL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_cli(home: BatchHome, inference: str, args: list[str], prelude: str = "", **env: str
            ) -> tuple[subprocess.CompletedProcess[str], int]:
    """`fashion batch <args>` in its own process (the installed CLI's code, after `prelude`); returns the
    finished process and its peak resident memory in bytes."""
    code = f"{prelude}\nimport sys\nfrom fashion.cli import main\nsys.exit(main(sys.argv[1:]))"
    with tempfile.NamedTemporaryFile("r") as peak:
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, peak.name, sys.executable, "-c", code, "batch", *args],
                             cwd=home.workdir, env={**os.environ, "COLUMNS": "200", **home.env(inference), **env},
                             capture_output=True, text=True, timeout=240)
        return run, int(peak.read() or 0)


def padded_png(index: int, size: int) -> bytes:
    """A real 28x28 Fashion-MNIST PNG made `size` bytes long by a private ancillary chunk of noise (as big
    as a phone photo, as cheap to decode as the fixture model's images)."""
    png = encode(fashion_images(1, index)[0][0])
    noise = np.random.default_rng(index).bytes(size - len(png) - 12)
    chunk = struct.pack(">I", len(noise)) + b"prVt" + noise + struct.pack(">I", zlib.crc32(b"prVt" + noise))
    return png[:-12] + chunk + png[-12:]  # before IEND (its last 12 bytes)


def test_memory_is_bounded_by_the_chunk_bytes_not_by_the_claim(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    write_images(home.data / "small", 2)
    big = {f"photo_{i:03d}.png": padded_png(i, MIB) for i in range(120)}
    (home.data / "inbox").mkdir(parents=True)
    for name, data in big.items():
        (home.data / "inbox" / name).write_bytes(data)
    claim = sum(len(d) for d in big.values())
    # The 120 files are one claim (FASHION_BATCH_CHUNK_SIZE); one file per ClassifyBatch call, one call in
    # flight. Measured: about 30 MiB over the small run when read chunk by chunk, 135 MiB when read at once.
    limits = {"FASHION_BATCH_CHUNK_SIZE": "256", "FASHION_BATCH_CHUNK_BYTES": str(256 * 1024),
              "FASHION_BATCH_IN_FLIGHT": "1"}

    baseline, baseline_rss = run_cli(home, inference_server.address, ["run", "small"], **limits)
    assert baseline.returncode == 0, baseline.stdout + baseline.stderr
    run, rss = run_cli(home, inference_server.address, ["run", "inbox"], **limits)
    assert run.returncode == 0, run.stdout + run.stderr

    found = files_under(home.output)
    assert all(len(found.get(name, [])) == 1 and found[name][0].read_bytes() == data for name, data in big.items())
    assert not any((home.data / "inbox").iterdir())
    held = rss - baseline_rss
    assert held < claim / 2, (f"peak RSS {rss / MIB:.0f} MiB, {held / MIB:.0f} MiB over a small run, "
                              f"for a claim of {claim / MIB:.0f} MiB read {256 * 1024} bytes at a time")


# Records the folders (device, inode) that os.fsync really synced, then runs the CLI unchanged: which
# folders are durable, seen where the kernel is asked, whatever descriptors the code passed.
FSYNC_SPY = """
import atexit, os, stat, sys
_fsync, _synced = os.fsync, set()
def _spy(fd):
    _fsync(fd)
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        _synced.add((st.st_dev, st.st_ino))
os.fsync = _spy
atexit.register(lambda: open(os.environ["FSYNC_SPY_OUT"], "a").writelines(f"{d} {i}\\n" for d, i in _synced))
"""


@pytest.mark.parametrize("path", ["sort", "recovery"])
def test_every_folder_a_group_touches_is_fsynced_past_the_open_folder_limit(
        tmp_path: Path, inference_server: ServiceProcess, path: str) -> None:
    """300 folders (more than tree.MAX_OPEN) lose a file each in one sorted group, or in one recovery
    after a crash between recording the destinations and moving anything."""
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    sources = [inbox / f"folder_{i:03d}" for i in range(300)]
    images: dict[str, bytes] = {}
    for i, folder in enumerate(sources):
        images |= write_images(folder, 1, start=i)
    spied = tmp_path / "synced.txt"
    env = {"FASHION_BATCH_CHUNK_SIZE": "512", "FSYNC_SPY_OUT": str(spied)}
    if path == "recovery":
        crashed, _ = run_cli(home, inference_server.address, ["run", "-r", "inbox"], FASHION_BATCH_FAILPOINT="planned",
                             **env)
        assert crashed.returncode == -9, crashed.stdout + crashed.stderr
        assert home.query("SELECT COUNT(*) FROM files WHERE state = 'moving'") == [(300,)]
    run, _ = run_cli(home, inference_server.address, ["run", "-r", "inbox"], prelude=FSYNC_SPY, **env)
    assert run.returncode == 0, run.stdout + run.stderr
    if path == "recovery":
        assert "Recovered 300 transfers interrupted by a crash" in "".join(
            p.read_text(encoding="utf-8") for p in (home.workdir / "logs").rglob("*.log"))

    found = files_under(home.output)
    assert sorted(found) == sorted(images) and all(len(p) == 1 for p in found.values())
    touched = {*sources, *(places[0].parent for places in found.values())}
    synced = {tuple(map(int, line.split())) for line in spied.read_text().splitlines()}
    missed = sorted(str(f.relative_to(home.data)) for f in touched
                    if (f.stat().st_dev, f.stat().st_ino) not in synced)
    assert not missed, f"{len(missed)} of {len(touched)} folders that lost or received a file were not fsynced"


def remove_nested(top: Path, deepest: Path) -> None:
    """Delete the folders from `deepest` up to (not including) `top`, and their files, bottom-up: shutil.rmtree
    and pytest's cleanup of old temporary folders recurse once per level."""
    folder = deepest
    while folder != top:
        for entry in folder.iterdir():
            entry.unlink()
        folder.rmdir()
        folder = folder.parent


def test_a_folder_deeper_than_the_recursion_limit_fails_only_its_own_files(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    home = BatchHome(tmp_path)
    inbox = home.data / "inbox"
    images = write_images(inbox, 1, prefix="good")
    deep = inbox
    for _ in range(1000):  # os.makedirs recurses as deep
        deep = deep / "a"
        deep.mkdir()
    try:
        deep_image = write_images(deep, 1, start=1, prefix="deep")
        run, _ = run_cli(home, inference_server.address, ["run", "-r", "inbox"])
        deep_left = {p.name: p.read_bytes() for p in deep.iterdir()}
    finally:
        remove_nested(inbox, deep)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCEEDED" in run.stdout and "RecursionError" not in run.stdout + run.stderr, run.stdout + run.stderr
    found = files_under(home.output)
    assert [p.read_bytes() for p in found.get("good_0000.png", [])] == list(images.values())
    # The deep image is sorted like any other, or left in place with its reason in the reports.
    [(name, data)] = deep_image.items()
    csv_file = next((home.workdir / "results" / "batch_results").glob("batch_results_*.csv"))
    rows = {r["filename"]: r for r in read_csv(csv_file)}
    assert sorted(rows) == ["a/" * 1000 + name, "good_0000.png"], sorted(rows)
    if name in found:
        assert [p.read_bytes() for p in found[name]] == [data] and not deep_left
    else:
        assert deep_left == {name: data} and rows["a/" * 1000 + name]["status"] == "failed"
