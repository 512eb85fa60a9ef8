"""The Inference service when the world treats it badly: its model file replaced or broken while it
serves, worker processes stopped (hung, not dead), a full disk under its server processes' run folder.
Each test owns its server, on real ports, and talks to it through real gRPC channels."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fashion.client import InferenceClient
from services.inference.imaging import Preprocessor
from tests.batch.conftest import fill, tmpfs
from tests.conftest import start_inference
from tests.images import encode, fashion_images
from tests.support import LABELS, build_linear_model, health_status, linear_expected, process_tree


def workers_of(pid: int) -> list[int]:
    """The worker processes of the Inference service process `pid`."""
    return sorted(process_tree(pid) - {pid})


def expected_categories(wb: np.ndarray, images: list[bytes]) -> list[str]:
    """What the fixture model `wb` answers for `images`, preprocessed as the service does."""
    pre = Preprocessor(width=28, height=28, mean=(0.5,), std=(0.5,))
    probs = linear_expected(wb, np.stack([pre(image) for image in images]))
    return [LABELS[i] for i in probs.argmax(axis=1)]


def test_workers_restarted_after_the_model_file_changed_run_the_model_the_service_loaded(tmp_path: Path) -> None:
    """A worker restarted while the service runs (OOM kill, crash) must run the model the service loaded
    and reports (its labels, its version), never a file replaced since, nor fail on one truncated since."""
    model_dir = tmp_path / "model"
    loaded = build_linear_model(model_dir, seed=0)
    svc = start_inference(tmp_path / "run", model_dir, FASHION_WORKER_PROCESSES="2")
    try:
        svc.wait_serving()
        x, _ = fashion_images(24)
        images = [encode(img) for img in x]
        want = expected_categories(loaded, images)
        other = build_linear_model(tmp_path / "other", seed=5)
        assert expected_categories(other, images) != want, "the two models must disagree for the test to mean much"
        with InferenceClient(svc.address) as client:
            assert [r.category for r in client.classify_batch(images).results] == want
            # A new model rolled out over the running one's file, then the workers die.
            os.replace(tmp_path / "other" / "model.onnx", model_dir / "model.onnx")
            for pid in workers_of(svc.proc.pid):
                os.kill(pid, signal.SIGKILL)
            for _ in range(2):  # each batch meets one dead worker and replaces it
                assert [r.category for r in client.classify_batch(images).results] == want
            # The file truncated in place, and the workers die again.
            (model_dir / "model.onnx").write_bytes(b"\x08\x07")
            for pid in workers_of(svc.proc.pid):
                os.kill(pid, signal.SIGKILL)
            for _ in range(2):
                results = client.classify_batch(images).results
                assert [r.error.message for r in results] == [""] * len(images)
                assert [r.category for r in results] == want
        assert health_status(svc.address) == "SERVING"
    finally:
        svc.terminate()


def test_stopped_workers_are_replaced_and_their_callers_answered(tmp_path: Path, linear_model) -> None:
    """Worker processes SIGSTOPped (hung, not dead) with batches on them: the calls are answered by fresh
    workers within seconds instead of hanging to their deadlines, and the service goes on."""
    model_dir, wb = linear_model
    svc = start_inference(tmp_path / "run", model_dir, FASHION_WORKER_PROCESSES="2")
    stopped: list[int] = []
    try:
        svc.wait_serving()
        x, _ = fashion_images(16)
        images = [encode(img) for img in x]
        want = expected_categories(wb, images)
        stopped = workers_of(svc.proc.pid)
        assert len(stopped) == 2
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        with InferenceClient(svc.address) as client, ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(client.classify_batch, images, timeout_s=25) for _ in range(4)]
            for call in calls:
                assert [r.category for r in call.result().results] == want
            assert [r.category for r in client.classify_batch(images).results] == want
        fresh = workers_of(svc.proc.pid)
        assert len(fresh) == 2 and not set(fresh) & set(stopped), "the stopped workers were replaced"
        assert health_status(svc.address) == "SERVING"
        errors = (tmp_path / "run" / "logs" / "api_errors.log").read_text()
        assert "made no progress" in errors and "stopped or hung" in errors, errors
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        svc.terminate()


def wait_for_line(path: Path, text: str, timeout: float = 20.0) -> str:
    """The log file `path` once it holds `text` (AssertionError with its content after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"no {text!r} in {path}:\n{content}"
        time.sleep(0.1)


def test_a_server_process_is_not_restarted_onto_a_full_run_folder_and_is_once_space_returns(
        tmp_path: Path, linear_model) -> None:
    """Several server processes: their run folder (under TMPDIR) fills up, then one of them dies. Its
    replacement would die at once of SIGBUS on its memory-mapped metrics files, again and again, the log
    saying only "exited with -7": instead the parent says why it waits, and restarts it once space returns."""
    with tmpfs(tmp_path / "tmpdir", "16m") as tmpdir:
        svc = start_inference(tmp_path / "run", linear_model[0], FASHION_INFERENCE_PROCESSES="2",
                              FASHION_WORKER_PROCESSES="0", TMPDIR=str(tmpdir))
        errors = tmp_path / "run" / "logs" / "api_errors.log"
        try:
            svc.wait_serving()
            filler = fill(tmpdir)
            first = workers_of(svc.proc.pid)[0]
            os.kill(first, signal.SIGKILL)
            log = wait_for_line(errors, "not started")
            assert "run folder" in log and "TMPDIR" in log and "KiB free" in log, log
            filler.unlink()
            wait_for_line(tmp_path / "run" / "logs" / "api.log", "Inference server process 1 of 2 restarted")
            svc.wait_serving()
            x, _ = fashion_images(1)
            for _ in range(4):  # new connections: the kernel spreads them over both processes
                with InferenceClient(svc.address) as client:
                    assert client.classify(encode(x[0])).category
            assert len(workers_of(svc.proc.pid)) == 2
            assert "SIGBUS" not in errors.read_text(), errors.read_text()
        finally:
            svc.terminate()
