"""`fashion classify` as a user runs it (its own process, a real Inference service on a real port) against
what the world hands it: files that are no files (a FIFO, /dev/zero, a folder), a file larger than a call
carries, more bytes than one call carries, an unreadable file, a reader that goes away (`| head -1`),
a service that goes away mid-command, and one too slow for the --timeout given. Each file gets its own
answer, in the order given, and the exit code is the documented one: 0 all classified, 1 some could
not be, 2 the service failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fashion.v1 import inference_pb2 as pb
from fashion.v1 import inference_pb2_grpc as pb_grpc
from tests.images import encode, fashion_images
from tests.support import changed_command, inference_stand_in

MEMORY_LIMIT = 3 << 30  # address space of the command: reading /dev/zero must end in its own line, not the OOM killer


def fashion(*args: str, address: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: no right to ignore file permissions (CI runs as root), bounded memory."""
    command = changed_command([sys.executable, "-m", "fashion.cli", *args, "--address", address], unprivileged=True,
                              memory_limit=MEMORY_LIMIT)
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for index, image in enumerate(fashion_images(2)[0]):
        paths.append(folder / f"item{index}.png")
        paths[-1].write_bytes(encode(image))
    return paths


def unusable(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """Files of `kind` for the command line, and the start of the error each must get."""
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe.png")  # nobody writes: reading it would wait forever
        return [str(tmp_path / "pipe.png")], "cannot read: not a regular file"
    if kind == "/dev/zero":
        return ["/dev/zero"], "cannot read: not a regular file"
    if kind == "folder":
        return [str(tmp_path)], "a folder: name its images"
    if kind == "huge":
        huge = tmp_path / "huge.png"
        with open(huge, "wb") as f:
            f.truncate(200 << 20)  # 200 MiB (sparse): more than one call may carry
        return [str(huge)], "too large to classify: 200.0 MiB (limit 15.9 MiB)"
    if kind == "unreadable":
        secret = tmp_path / "secret.png"
        secret.write_bytes(b"\x89PNG")
        secret.chmod(0)
        return [str(secret)], "cannot read: Permission denied"
    assert kind == "20 MiB together"  # each fits a call, all of them together do not
    paths = []
    for index in range(20):
        paths.append(tmp_path / f"scan{index}.png")
        paths[-1].write_bytes(os.urandom(1 << 20))
    return [str(p) for p in paths], "not an image"


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder", "huge", "unreadable", "20 MiB together"])
def test_each_unusable_file_gets_its_own_line_and_the_rest_are_classified(inference_server, images: list[Path],
                                                                          tmp_path: Path, kind: str) -> None:
    bad, reason = unusable(tmp_path, kind)
    files = [str(images[0]), *bad, str(images[1])]
    out = fashion("classify", "--json", *files, address=inference_server.address)
    assert out.returncode == 1, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [row["file"] for row in rows] == files  # one line each, in the order given
    assert rows[0]["category"] and rows[-1]["category"], rows
    assert all(row["error"].startswith(reason) for row in rows[1:-1]), rows[1:-1]
    assert out.stderr == ""


@pytest.mark.parametrize("output", ["--json", "--table"])
def test_a_reader_that_goes_away_changes_no_exit_code(inference_server, images: list[Path], output: str) -> None:
    """`fashion classify ... | head -0`: the reader is gone before the first line; a file that could not be
    classified still makes the exit code 1, with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        options = ["--json"] if output == "--json" else []
        out = fashion("classify", *options, str(images[0]), "missing.png", address=inference_server.address,
                      stdout=write_end)
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (1, "")


class Restarting(pb_grpc.InferenceServiceServicer):
    """Answers the first ClassifyBatch call, then UNAVAILABLE: a service that went away mid-command."""

    def __init__(self) -> None:
        self.calls = 0

    def ClassifyBatch(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls > 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return pb.ClassifyBatchResponse(results=[pb.ClassifyResponse(category="Bag", confidence=0.9)
                                                 for _ in request.images])


@pytest.fixture
def restarting() -> Iterator[tuple[Restarting, str]]:
    servicer = Restarting()
    with inference_stand_in(servicer) as address:
        yield servicer, address


def test_answers_before_the_service_went_away_are_printed(restarting: tuple[Restarting, str], tmp_path: Path
                                                          ) -> None:
    """100 files are two calls; the second one fails: the 64 answers of the first are printed (JSON lines,
    or the table), then one error line, exit 2."""
    servicer, address = restarting
    files = []
    for index in range(100):
        files.append(str(tmp_path / f"item{index}.png"))
        Path(files[-1]).write_bytes(b"image")
    out = fashion("classify", "--json", *files, address=address)
    assert out.returncode == 2
    assert [json.loads(line)["file"] for line in out.stdout.splitlines()] == files[:64]
    assert out.stderr.startswith("error: UNAVAILABLE: restarting") and len(out.stderr.splitlines()) == 1
    servicer.calls = 0
    out = fashion("classify", *files, address=address)
    assert out.returncode == 2 and out.stdout.count(" Bag ") == 64, out.stdout


@pytest.mark.parametrize("top_k", ["-1", str(2**40)])
def test_a_top_k_the_wire_cannot_carry_is_a_bad_argument(images: list[Path], top_k: str) -> None:
    """--top-k is a uint32 on the wire: out of its range is one line and exit 2, not a ValueError traceback."""
    out = fashion("classify", "--top-k", top_k, str(images[0]), address="127.0.0.1:1")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: --top-k {top_k}: ") and len(out.stderr.splitlines()) == 1, out.stderr


class Slow(pb_grpc.InferenceServiceServicer):
    """Answers every call after `delay_s`: a service too slow for a short --timeout."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def _answer_late(self, answer):  # type: ignore[no-untyped-def]
        time.sleep(self.delay_s)
        return answer

    def ClassifyBatch(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer_late(pb.ClassifyBatchResponse(
            results=[pb.ClassifyResponse(category="Bag", confidence=0.9) for _ in request.images]))

    def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer_late(pb.Stats(total_requests=7))

    def GetModelInfo(self, request, context):  # type: ignore[no-untyped-def]
        return self._answer_late(pb.ModelInfo(name="slow-model"))


@pytest.mark.parametrize("command", [["classify", "PHOTO"], ["stats"], ["model", "info"]])
def test_timeout_sets_each_calls_deadline_and_a_missed_one_says_so(images: list[Path], command: list[str]) -> None:
    """--timeout is each call's deadline (30 s before, with no way to change it): 0.3 s against a service that
    answers after 1.5 s is exit 2 and one line naming the deadline; 10 s gets the answer."""
    args = [str(images[0]) if word == "PHOTO" else word for word in command]
    with inference_stand_in(Slow(1.5)) as address:
        out = fashion(*args, "--timeout", "0.3", address=address)
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert out.stderr.startswith("error: DEADLINE_EXCEEDED") and len(out.stderr.splitlines()) == 1, out.stderr
        assert f"Inference service at {address} within 0.3 s: --timeout sets it" in out.stderr
        out = fashion(*args, "--timeout", "10", address=address)
        answer = {"classify": "Bag", "stats": '"total_requests": 7', "model": '"name": "slow-model"'}[command[0]]
        assert out.returncode == 0 and answer in out.stdout, out


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "soon"])
def test_a_timeout_that_is_no_deadline_is_a_bad_argument(seconds: str) -> None:
    out = fashion("stats", "--timeout", seconds, address="127.0.0.1:1")
    words = "not a number of seconds" if seconds == "soon" else "must be more than 0 and at most 86400 seconds"
    assert out.returncode == 2 and out.stdout == "" and f"--timeout: {words}" in out.stderr, out.stderr
