"""Seeded chaos: one recursive job of 2,000 images while the world misbehaves at random moments.

Per seed, at random points of the job's progress: the Batch service is SIGKILLed twice and the
Inference service once (each restarted after a random pause), one subfolder is swapped for a
symbolic link to a folder outside the data root holding other files under the same names, one
subfolder turns read-only, and the output filesystem (a size-limited tmpfs, so every move crosses
filesystems) fills up, then frees again. The Batch service runs without root's right to ignore
file permissions. Afterwards: every image's bytes exactly once under the data root, nothing
outside touched or moved in, no transfer left in flight, the CSV one row per processed image.

`make test` runs FASHION_CHAOS_SEEDS (default 5) seeds on SQLite and the first
FASHION_CHAOS_POSTGRES_SEEDS (default 2) of them again on PostgreSQL; `make chaos SEEDS=50` runs
more. A failure names its seed, store and the events as they happened: FASHION_CHAOS_FIRST_SEED=<seed>
with FASHION_CHAOS_SEEDS=1 replays it.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import (
    BatchHome,
    _database,
    contents,
    digest,
    fill,
    read_csv,
    regular_files_by_digest,
    tmpfs,
)
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, free_port

SEEDS = int(os.environ.get("FASHION_CHAOS_SEEDS", "5"))
FIRST_SEED = int(os.environ.get("FASHION_CHAOS_FIRST_SEED", "0"))
POSTGRES_SEEDS = min(SEEDS, int(os.environ.get("FASHION_CHAOS_POSTGRES_SEEDS", "2")))
RUNS = [(seed, "sqlite") for seed in range(FIRST_SEED, FIRST_SEED + SEEDS)] + [
    (seed, "postgres") for seed in range(FIRST_SEED, FIRST_SEED + POSTGRES_SEEDS)]
IMAGES = 2000
SUBFOLDERS = 4
INJECT_FOR_S = 90.0  # after this, no more faults: the job is left to finish
FINISH_WITHIN_S = 90.0
CHUNKS = {"FASHION_BATCH_CHUNK_SIZE": "4", "FASHION_BATCH_IN_FLIGHT": "1"}  # small steps: faults land between them


@pytest.fixture(scope="module")
def chaos_images() -> dict[str, bytes]:
    """2,000 distinct PNGs named s<k>/img_<i>.png (identical pictures would blur the conservation count)."""
    x, _ = fashion_images(IMAGES + 200)
    images: dict[str, bytes] = {}
    seen: set[str] = set()
    for pixels in x:
        data = encode(pixels)
        if digest(data) in seen:
            continue
        seen.add(digest(data))
        n = len(images)
        images[f"s{n % SUBFOLDERS}/img_{n:04d}.png"] = data
        if len(images) == IMAGES:
            return images
    raise AssertionError("not enough distinct test images")


@dataclass
class World:
    """The processes and folders one seed plays with, and what happened to them."""

    home: BatchHome
    model_dir: Path
    inference_port: int
    rng: random.Random
    batch: ServiceProcess | None = None
    inference: ServiceProcess | None = None
    inference_back_at: float = 0.0
    filler: Path | None = None
    outside: dict[str, str] = field(default_factory=dict)
    """The folder outside the data root as the swap left it (contents())."""
    events: list[str] = field(default_factory=list)

    def note(self, what: str, done: int) -> None:
        self.events.append(f"{what} at {done}/{IMAGES}")

    def start_batch(self) -> None:
        self.batch = self.home.start(f"127.0.0.1:{self.inference_port}", unprivileged=True, **CHUNKS)

    def start_inference(self) -> None:
        self.inference = start_inference(self.home.workdir / "inference", self.model_dir,
                                         FASHION_INFERENCE_PORT=str(self.inference_port))

    def stop_all(self) -> None:
        for process in (self.batch, self.inference):
            if process is not None:
                process.kill()


def progress(home: BatchHome, job_id: str) -> tuple[str, int]:
    """The job's state and how many of its images are done, read from the jobs database."""
    state = home.query("SELECT state FROM jobs WHERE job_id = ?", (job_id,))[0][0]
    done = home.query("SELECT COUNT(*) FROM files WHERE job_id = ? AND state = 'done'", (job_id,))[0][0]
    return state, done


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("seed", "store"), RUNS, ids=[f"seed={seed}-{store}" for seed, store in RUNS])
def test_chaos_loses_duplicates_and_escapes_nothing(
        request: pytest.FixtureRequest, tmp_path: Path, linear_model: tuple[Path, np.ndarray],
        chaos_images: dict[str, bytes], seed: int, store: str) -> None:
    rng = random.Random(seed)
    home = BatchHome(tmp_path / "home", _database(request, store))
    inbox = home.data / "inbox"
    for rel, data in chaos_images.items():
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data)
    elsewhere = tmp_path / "elsewhere"  # outside the data root: other bytes under the images' own names
    elsewhere.mkdir()
    for rel in chaos_images:
        (elsewhere / os.path.basename(rel)).write_bytes(b"outside the data root: " + rel.encode())
    world = World(home, linear_model[0], free_port(), rng, outside=contents(elsewhere))
    with tmpfs(home.output, size="24m"):
        try:
            job_id = run_chaos(world, elsewhere)
            job = finish(world, job_id)
        except BaseException as exc:
            world.stop_all()
            raise AssertionError(f"chaos seed {seed} ({store}): {exc!r}; events: {world.events}") from exc
        world.stop_all()
        print(f"chaos seed {seed} ({store}): {pb.JobState.Name(job.state)}, {job.processed} processed, "
              f"{job.failed} failed; events: {world.events}")  # shown with a failure, and by `make chaos`
        check(world, job, chaos_images, elsewhere, seed)


def run_chaos(world: World, elsewhere: Path) -> str:
    rng, home = world.rng, world.home
    events = sorted([
        (rng.uniform(0.05, 0.9), "kill batch"), (rng.uniform(0.05, 0.9), "kill batch"),
        (rng.uniform(0.05, 0.9), "kill inference"), (rng.uniform(0.05, 0.8), "swap a subfolder for a link"),
        (rng.uniform(0.05, 0.8), "make a subfolder read-only"),
    ])
    full_at = rng.uniform(0.05, 0.8)
    events = sorted([*events, (full_at, "fill the output disk"), (full_at + rng.uniform(0.02, 0.15), "free it")])
    world.start_inference()
    world.start_batch()
    assert world.batch is not None
    with BatchClient(world.batch.address) as client:
        job_id = client.submit("inbox", recursive=True).job_id
    deadline = time.monotonic() + INJECT_FOR_S
    while time.monotonic() < deadline and events:
        state, done = progress(home, job_id)
        if state in ("succeeded", "failed", "cancelled"):
            break
        if events and done >= events[0][0] * IMAGES:  # one at a time: a killed service is back before the next
            apply(world, events.pop(0)[1], done, elsewhere)
        keep_alive(world, done)
        time.sleep(0.01)
    return job_id


def apply(world: World, event: str, done: int, elsewhere: Path) -> None:
    rng, inbox = world.rng, world.home.data / "inbox"
    subfolders = sorted(p for p in inbox.iterdir() if p.is_dir() and not p.is_symlink() and "_" not in p.name)
    if event == "kill batch" and world.batch is not None:
        world.batch.proc.send_signal(signal.SIGKILL)
        world.batch.proc.wait()
    elif event == "kill inference" and world.inference is not None:
        world.inference.proc.send_signal(signal.SIGKILL)
        world.inference.proc.wait()
        world.inference_back_at = time.monotonic() + rng.uniform(0.5, 3.0)
    elif event == "swap a subfolder for a link" and subfolders:
        victim = rng.choice(subfolders)
        victim.rename(victim.with_name(victim.name + "_moved"))
        victim.symlink_to(elsewhere, target_is_directory=True)
        event += f" ({victim.name})"
    elif event == "make a subfolder read-only" and subfolders:
        victim = rng.choice(subfolders)
        victim.chmod(0o555)
        event += f" ({victim.name})"
    elif event == "fill the output disk":
        world.filler = fill(world.home.output)
    elif event == "free it" and world.filler is not None:
        world.filler.unlink()
        world.filler = None
    world.note(event, done)


def keep_alive(world: World, done: int) -> None:
    """Restart what was killed: the Batch service at once (it resumes the job), the Inference service
    after its pause."""
    if world.batch is not None and world.batch.proc.poll() is not None:
        world.note(f"Batch service restarted (exit {world.batch.proc.returncode})", done)
        world.start_batch()
    if world.inference is not None and world.inference.proc.poll() is not None \
            and time.monotonic() >= world.inference_back_at:
        world.note("Inference service restarted", done)
        world.start_inference()


def finish(world: World, job_id: str) -> pb.Job:
    """Everything back up and the disk freed; the job's end."""
    if world.filler is not None:
        world.filler.unlink()
        world.filler = None
    world.inference_back_at = 0.0
    keep_alive(world, -1)
    assert world.batch is not None
    with BatchClient(world.batch.address) as client:
        return client.wait(job_id, timeout_s=FINISH_WITHIN_S)


def check(world: World, job: pb.Job, images: dict[str, bytes], elsewhere: Path, seed: int) -> None:
    home = world.home
    where = f"chaos seed {seed} ({home.store}), events {world.events}"
    assert job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED), (where, job)
    if job.state == pb.JOB_STATE_FAILED:
        assert job.error, (where, job)
    found = regular_files_by_digest(home.data)
    lost = [rel for rel, data in images.items() if not found.get(digest(data))]
    twice = {rel: found[digest(data)] for rel, data in images.items() if len(found.get(digest(data), [])) > 1}
    assert not lost and not twice, (where, f"lost {lost[:5]} ({len(lost)})", f"in two places {list(twice.items())[:5]}")
    moved_in = [rel for rel, what in world.outside.items() if what in found]
    assert not moved_in, (where, "files from outside the data root moved in", moved_in[:5])
    assert contents(elsewhere) == world.outside, (where, "the folder outside the data root changed")
    assert not [p for p in contents(home.data) if ".batch-" in p and p.endswith(".part")], (where, "staging left")
    unfinished = home.query("SELECT COUNT(*) FROM files WHERE state != 'done'")[0][0]
    assert unfinished == 0, (where, f"{unfinished} rows still pending or moving")
    rows = read_csv(home.workdir / job.results_csv)
    names = [r["filename"] for r in rows]
    assert len(names) == len(set(names)) == job.processed, (where, len(names), len(set(names)), job.processed)
    # Whatever the chaos did, every image is somewhere it belongs: sorted, or left in the input folders.
    for rel, data in images.items():
        place = found[digest(data)][0]
        assert place.startswith(("processed_batches/", "inbox/")), (where, rel, place)
