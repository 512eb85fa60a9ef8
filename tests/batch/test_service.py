"""The Batch service through real gRPC channels on real ports (its own process, with the shared
Inference service): sorting, reports, path confinement, copy mode, errors, statistics."""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import grpc
import pytest

from fashion.client import BatchClient
from fashion.client.batch import FINISHED
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import (
    BatchHome,
    expected_sorting,
    files_under,
    fill,
    read_csv,
    read_summary,
    tmpfs,
    wait_for,
    write_images,
)
from tests.images import encode, fashion_images
from tests.support import ServiceProcess, health_status

pytestmark = pytest.mark.timeout(120)


def test_every_input_ends_in_exactly_one_place_with_the_seeds_reports(
        batch_home: BatchHome, batch_server: ServiceProcess, linear_model, tmp_path: Path) -> None:
    _, wb = linear_model
    inbox = batch_home.data / "shop"
    images = write_images(inbox, 40)
    x, _ = fashion_images(1, 500)
    broken = {"broken.png": encode(x[0])[:70], "fake.jpg": b"this is a price list, not a jpeg"}
    for name, data in broken.items():
        (inbox / name).write_bytes(data)
    (inbox / "notes.txt").write_text("not an image")
    outside = tmp_path / "secret.png"
    outside.write_bytes(images["item_0001.png"])
    (inbox / "escape.png").symlink_to(outside)
    ignored = {".DS_Store": b"\0", "upload.png.part": b"\x89PNG half", "~$lock.png": b"x"}
    for name, data in ignored.items():
        (inbox / name).write_bytes(data)
    nested = write_images(inbox / "sub", 2, start=100, prefix="nested")  # not recursive: stays
    expected = expected_sorting(wb, images)
    # A file already holds the name item_0000.png in the folder item_0000.png goes to.
    taken = batch_home.output / expected["item_0000.png"][2] / "item_0000.png"
    taken.parent.mkdir(parents=True, exist_ok=True)
    taken.write_bytes(b"a different photo, already sorted")

    with BatchClient(batch_server.address) as client:
        submitted = client.submit("shop")
        events = list(client.watch(submitted.job_id, timeout_s=90))
        job = client.get(submitted.job_id)
    assert submitted.state == pb.JOB_STATE_QUEUED and submitted.trigger == "api"
    assert events[-1].job.state == job.state == pb.JOB_STATE_SUCCEEDED, job

    # Every input in exactly one place, bytes intact.
    expected_places = {name: batch_home.output / folder / name for name, (_, _, folder) in expected.items()}
    expected_places["item_0000.png"] = taken.with_name("item_0000_1.png")  # the collision got a suffix
    expected_places |= {name: batch_home.output / "_failed" / name for name in broken}
    expected_places |= {name: inbox / "sub" / name for name in nested}
    expected_places |= {"notes.txt": inbox / "notes.txt", "escape.png": inbox / "escape.png"}
    expected_places |= {name: inbox / name for name in ignored}
    found = files_under(batch_home.data)
    for name, place in expected_places.items():
        others = [p for p in found.get(place.name, []) if p != taken]
        assert others == [place], f"{name}: expected only at {place}, found {others}"
    for name, data in {**images, **broken, **nested}.items():
        assert expected_places[name].read_bytes() == data, name
    assert taken.read_bytes() == b"a different photo, already sorted"
    assert (inbox / "escape.png").is_symlink() and outside.read_bytes() == images["item_0001.png"]

    successful = [n for n, (_, _, folder) in expected.items() if folder != "_uncertain"]
    categories = collections.Counter(expected[n][0] for n in successful)
    assert (job.total, job.processed, job.failed, job.skipped) == (42, 42, 2, 3)  # sub/ is said, not sorted
    assert (job.successful, job.uncertain) == (len(successful), 40 - len(successful))
    assert dict(job.categories) == categories
    assert job.min_confidence == pytest.approx(0.3)

    # CSV: one row per image, the monitoring guide's columns; "error" for images that could not be classified.
    rows = {r["filename"]: r for r in read_csv(batch_home.workdir / job.results_csv)}
    assert set(rows) == set(images) | set(broken)
    for name, (label, confidence, folder) in expected.items():
        row = rows[name]
        assert row["category"] == label
        assert float(row["confidence"]) == pytest.approx(confidence, abs=1e-3)
        assert row["status"] == ("uncertain" if folder == "_uncertain" else "success")
        assert row["timestamp"].startswith(str(job.finished_at.ToDatetime().year))
    assert all((rows[n]["status"], rows[n]["category"], rows[n]["confidence"]) == ("error", "", "") for n in broken)

    summary = read_summary(batch_home.workdir / job.summary_json)
    assert list(summary)[:5] == ["timestamp", "total_processed", "successful", "failed", "categories"]
    assert (summary["total_processed"], summary["successful"], summary["failed"]) == (42, len(successful), 2)
    assert summary["categories"] == categories and summary["job_id"] == job.job_id
    assert summary["duration_seconds"] > 0 and summary["uncertain"] == 40 - len(successful)
    assert str(summary["timestamp"]) in job.results_csv and str(summary["timestamp"]) in job.log_file
    assert {e["filename"] for e in summary["errors"]} == set(broken)  # type: ignore[union-attr]
    assert "not an image" in next(e["error"] for e in summary["errors"] if e["filename"] == "fake.jpg")  # type: ignore
    assert {s["filename"]: s["reason"] for s in summary["skipped_files"]} == {  # type: ignore[union-attr]
        "notes.txt": "not an image (.txt)", "escape.png": "symbolic link (links are not followed)",
        "sub": "a folder (its images are sorted by a recursive run, --recursive)"}

    log = (batch_home.workdir / job.log_file).read_text(encoding="utf-8")
    for line in ("] BATCH PROCESSING STARTED\n", "] ✓ API is healthy and ready\n", "] Found 42 images to process\n",
                 "] BATCH PROCESSING COMPLETED\n"):
        assert line in log, line
    assert "] \nProcessing [1/42]: " in log  # the monitoring guide's blank-line-then-header layout
    blocks: dict[str, tuple[int, list[str]]] = {}
    for block in log.split("\nProcessing [")[1:]:
        header, _, body = block.partition("\n")
        index, _, name = header.partition("/42]: ")
        lines = [line.split("] ", 1)[1] for line in body.split("\n") if line.startswith("[")]
        blocks[name] = (int(index), lines[:lines.index("")] if "" in lines else lines)
    assert sorted(i for i, _ in blocks.values()) == list(range(1, 43))
    for name, (label, confidence, folder) in expected.items():
        verdict = (f"  ✓ Category: {label} (confidence: {100 * confidence:.1f}%)" if folder != "_uncertain" else
                   f"  ⚠ Uncertain: {label} (confidence: {100 * confidence:.1f}%, below 30.0%)")
        target = "item_0000_1.png" if name == "item_0000.png" else name
        assert blocks[name][1] == [verdict, f"  ✓ Moved to: data/processed_batches/{folder}/{target}"], name
    fake = blocks["fake.jpg"][1]
    assert fake[0].startswith("  ✗ Error: not an image"), fake
    assert fake[1:] == ["  ✓ Moved to: data/processed_batches/_failed/fake.jpg"]

    # The stream: the job first, the scan's skipped files, an event per sorted group naming its images, the end.
    file_events = [f for e in events for f in e.files]
    assert len(file_events) == len({f.filename for f in file_events}), "each file reported once"
    assert sorted(f.filename for f in file_events if f.status != "skipped") == sorted([*images, *broken])
    assert {f.filename: f.error for f in file_events if f.status == "skipped"} == {
        "notes.txt": "not an image (.txt)", "escape.png": "symbolic link (links are not followed)",
        "sub": "a folder (its images are sorted by a recursive run, --recursive)"}
    by_name = {f.filename: f for f in file_events}
    assert by_name["fake.jpg"].status == "failed" and by_name["fake.jpg"].destination.endswith("_failed/fake.jpg")
    assert by_name["item_0000.png"].destination == f"processed_batches/{taken.parent.name}/item_0000_1.png"


def test_paths_escaping_the_data_root_are_refused_and_the_service_keeps_serving(
        batch_home: BatchHome, batch_server: ServiceProcess, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    write_images(outside, 2)
    before = sorted(p.name for p in outside.iterdir())
    batch_home.data.mkdir(parents=True, exist_ok=True)
    (batch_home.data / "link_out").symlink_to(outside, target_is_directory=True)
    write_images(batch_home.data / "legit", 3)
    (batch_home.data / "a_file.png").write_bytes(b"x")
    refused = [
        ({"input_dir": "../elsewhere"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the data root"),
        ({"input_dir": str(outside)}, grpc.StatusCode.INVALID_ARGUMENT, "outside the data root"),
        ({"input_dir": "link_out"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the data root"),
        ({"input_dir": "legit/../../elsewhere"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the data root"),
        ({"input_dir": "legit", "output_dir": "../sorted"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the data root"),
        ({"input_dir": "legit", "output_dir": "link_out"}, grpc.StatusCode.INVALID_ARGUMENT, "outside the data root"),
        ({"input_dir": "legit", "output_dir": "legit"}, grpc.StatusCode.INVALID_ARGUMENT, "same folder"),
        ({"input_dir": "legit", "min_confidence": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "between 0 and 1"),
        ({"input_dir": ".batch"}, *((grpc.StatusCode.INVALID_ARGUMENT, "jobs database") if batch_home.store == "sqlite"
                                    else (grpc.StatusCode.NOT_FOUND, "does not exist"))),  # no file of it here
        ({"input_dir": "a_file.png"}, grpc.StatusCode.INVALID_ARGUMENT, "not a folder"),
        ({"input_dir": ""}, grpc.StatusCode.INVALID_ARGUMENT, "input_dir is required"),
        ({"input_dir": "no/such/folder"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ]
    with BatchClient(batch_server.address) as client:
        for request, code, words in refused:
            with pytest.raises(grpc.RpcError) as err:
                client.submit(**request)  # type: ignore[arg-type]
            assert (err.value.code(), words in err.value.details()) == (code, True), (request, err.value.details())
        assert sorted(p.name for p in outside.iterdir()) == before
        assert health_status(batch_server.address, "fashion.v1.BatchService") == "SERVING"

        # A destination folder swapped for a link out of the root: nothing goes through it.
        out = batch_home.data / "guarded"
        out.mkdir()
        (out / "_uncertain").symlink_to(outside, target_is_directory=True)
        job = client.submit("legit", output_dir="guarded", min_confidence=1.0)  # everything is uncertain
        job = client.wait(job.job_id, timeout_s=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.failed == 3 and job.successful == 0
    assert sorted(p.name for p in outside.iterdir()) == before
    assert sorted(p.name for p in (batch_home.data / "legit").iterdir()) == ["item_0000.png", "item_0001.png",
                                                                             "item_0002.png"]


def test_copy_mode_recursive_custom_output_and_idempotent_submit(
        batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    top = write_images(batch_home.data / "catalog", 4)
    deep = write_images(batch_home.data / "catalog" / "2024" / "summer", 2, start=50, prefix="deep")
    with BatchClient(batch_server.address) as client:
        job = client.submit("catalog", mode="copy", recursive=True, output_dir="sorted/copies", idempotency_key="c1")
        again = client.submit("catalog", mode="copy", recursive=True, output_dir="sorted/copies",
                              idempotency_key="c1")
        job = client.wait(job.job_id, timeout_s=60)
    assert again.job_id == job.job_id
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.mode == pb.TRANSFER_MODE_COPY and job.processed == 6
    for name, data in top.items():
        assert (batch_home.data / "catalog" / name).read_bytes() == data  # originals stay
    for name, data in deep.items():
        assert (batch_home.data / "catalog" / "2024" / "summer" / name).read_bytes() == data
    copies = files_under(batch_home.data / "sorted" / "copies")
    assert sorted(copies) == sorted([*top, *deep])
    for name, data in {**top, **deep}.items():
        assert [p.read_bytes() for p in copies[name]] == [data]
    rows = read_csv(batch_home.workdir / job.results_csv)
    assert sorted(r["filename"] for r in rows) == sorted([*top, *(f"2024/summer/{n}" for n in deep)])


def test_resorting_the_uncertain_folder_moves_images_out_of_it(
        batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    uncertain = batch_home.data / "resort" / "_uncertain"
    files = write_images(uncertain, 3, start=200)
    with BatchClient(batch_server.address) as client:
        job = client.submit("resort/_uncertain", output_dir="resort", min_confidence=0.0)
        job = client.wait(job.job_id, timeout_s=60)
    assert job.state == pb.JOB_STATE_SUCCEEDED and job.successful == 3
    assert not list(uncertain.iterdir())
    assert sorted(files_under(batch_home.data / "resort")) == sorted(files)


def test_errors_name_the_problem(batch_server: ServiceProcess) -> None:
    with BatchClient(batch_server.address) as client:
        for call, code, words in [
            (lambda: client.get("0123456789abcdef"), grpc.StatusCode.NOT_FOUND, "no job"),
            (lambda: client.get(""), grpc.StatusCode.INVALID_ARGUMENT, "job_id is required"),
            (lambda: client.cancel("0123456789abcdef"), grpc.StatusCode.NOT_FOUND, "no job"),
            (lambda: list(client.watch("0123456789abcdef", timeout_s=5)), grpc.StatusCode.NOT_FOUND, "no job"),
            (lambda: client.list(limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
            (lambda: client.stats(days=-3), grpc.StatusCode.INVALID_ARGUMENT, "days"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code and words in err.value.details(), err.value.details()
        finished = client.list(1, pb.JOB_STATE_SUCCEEDED)
        if finished:
            with pytest.raises(grpc.RpcError) as err:
                client.cancel(finished[0].job_id)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already ended: SUCCEEDED" in err.value.details()
            assert client.get(finished[0].job_id[:8]).job_id == finished[0].job_id  # a unique prefix works


def test_batch_stats_add_up_to_the_jobs(batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    write_images(batch_home.data / "stats", 3, start=300)
    with BatchClient(batch_server.address) as client:
        client.wait(client.submit("stats").job_id, timeout_s=60)
        jobs = [j for j in client.list(1000) if j.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED,
                                                               pb.JOB_STATE_CANCELLED)]
        stats = client.stats()
    assert stats.days == 7 and len(stats.daily) == 7 and stats.active_jobs == 0
    assert stats.runs == len(jobs) >= 2
    for field in ("processed", "successful", "failed", "uncertain"):
        assert getattr(stats, "images" if field == "processed" else field) == sum(getattr(j, field) for j in jobs)
    assert sum(d.images for d in stats.daily) == stats.images and stats.daily[-1].runs == stats.runs
    totals: collections.Counter[str] = collections.Counter()
    for j in jobs:
        totals.update(dict(j.categories))
    assert {c.category: c.count for c in stats.top_categories} == totals
    # Uncertain images were classified (below the threshold): they count as successes, not failures.
    assert stats.successful + stats.uncertain + stats.failed == stats.images and stats.uncertain > 0
    assert stats.success_rate == pytest.approx(round(100 * (stats.successful + stats.uncertain) / stats.images, 2))
    assert stats.success_rate > 100 * stats.successful / stats.images
    today = stats.daily[-1]
    assert today.success_rate == pytest.approx(round(100 * (today.images - today.failed) / today.images, 2))
    assert stats.last_run_age_hours < 0.1 and stats.HasField("last_run_at")
    assert any("fake.jpg: not an image" in line for line in stats.recent_errors), stats.recent_errors
    # SQLite: the file under the data root; PostgreSQL: nothing of the jobs database there.
    assert os.path.exists(batch_home.data / ".batch" / "jobs.db") == (batch_home.store == "sqlite")


def test_a_full_log_disk_stops_no_job_and_the_service_says_what_was_lost(
        tmp_path: Path, inference_server: ServiceProcess) -> None:
    """The Batch service's logs folder fills up: jobs still run and succeed, the service keeps serving, a log
    file that cannot be written is said once; once there is space again its log says how many lines were lost."""
    home = BatchHome(tmp_path)
    with tmpfs(home.workdir / "logs", "256k") as logs:
        batch = home.start(inference_server.address)
        try:
            filler = fill(logs)
            service_log_full = "cannot write the log file logs/batch_service.log: No space left on device"
            with BatchClient(batch.address) as client:
                deadline = time.monotonic() + 60
                for round_ in range(100):  # until the service's own log has filled its last page too
                    images = write_images(home.data / f"inbox{round_}", 2)
                    job = client.submit(f"inbox{round_}", "", 0.5, False, f"out{round_}", "")
                    job = wait_for(client, job.job_id, lambda j: j.state in FINISHED, what="the job")
                    assert job.state == pb.JOB_STATE_SUCCEEDED, job
                    assert sorted(files_under(home.data / f"out{round_}")) == sorted(images)
                    if service_log_full in batch.output():
                        break
                    assert time.monotonic() < deadline, batch.output()
                assert health_status(batch.address, "fashion.v1.BatchService") == "SERVING"
                said = [line for line in batch.output().splitlines() if "cannot write the log file" in line]
                assert len(said) == len(set(said)) and len(said) >= 3, said  # once per file
                assert "Traceback" not in batch.output(), batch.output()
                filler.unlink()
                while "were lost while it could not be written" not in (logs / "batch_service.log").read_text():
                    client.list(1)  # something to log
                    assert time.monotonic() < deadline, batch.output()
                    time.sleep(0.1)
        finally:
            batch.terminate()
