"""Calls whose answer is lost: the Batch service carried the call out, then the connection broke before its
answer reached the client, and the channel retries the call (UNAVAILABLE). The key each submission carries
makes that retry return the job it made instead of starting a second job on the same folder; a cancel
retried finds its job cancelled and says so, not that the job "already ended"."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from fashion.client import BatchClient
from fashion.v1 import batch_pb2 as pb
from tests.batch.conftest import BatchHome, write_images
from tests.support import ServiceProcess, free_port

pytestmark = pytest.mark.timeout(120)
HEADERS = 0x1  # HTTP/2 frame type


class AnswerLosingProxy:
    """A TCP proxy to `target` that, on its first connection, closes both sides when the server starts its
    first answer (an HTTP/2 HEADERS frame on a stream): the request was carried out, its answer never arrives.
    Later connections are passed through."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.answers_lost = 0
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self._connections += 1
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, self._connections == 1),
                             daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _hang_up(source, sink)

    def _answers(self, server: socket.socket, client: socket.socket, lose_first: bool) -> None:
        """Server to client, frame by frame (after the 9-byte frame headers), dropping the connection at the
        first answer when `lose_first`."""
        buffer = b""
        try:
            while data := server.recv(65536):
                buffer += data
                while lose_first and len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    kind, stream = buffer[3], struct.unpack("!I", buffer[5:9])[0] & 0x7FFFFFFF
                    if kind == HEADERS and stream > 0:
                        self.answers_lost += 1
                        return
                    if len(buffer) < 9 + length:
                        break
                    client.sendall(buffer[:9 + length])
                    buffer = buffer[9 + length:]
                if not lose_first:
                    client.sendall(buffer)
                    buffer = b""
        except OSError:
            pass
        finally:
            _hang_up(server, client)

    def close(self) -> None:
        self.listener.close()


def _hang_up(*ends: socket.socket) -> None:
    """Close both sides now (shutdown first: a recv blocked in the other thread would keep the socket open)."""
    for end in ends:
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        end.close()


def test_a_submission_whose_answer_was_lost_makes_one_job(
        batch_home: BatchHome, batch_server: ServiceProcess) -> None:
    write_images(batch_home.data / "lost_answer", 3)
    host, port = batch_server.address.rsplit(":", 1)
    proxy = AnswerLosingProxy((host, int(port)))
    try:
        with BatchClient(proxy.address) as client:
            job = client.submit("lost_answer", output_dir="lost_answer_sorted")
    finally:
        proxy.close()
    assert proxy.answers_lost == 1  # the first answer never arrived: the job came from the channel's retry
    jobs = batch_home.query("SELECT job_id FROM jobs WHERE input_dir = 'lost_answer'")
    assert [job_id for job_id, in jobs] == [job.job_id], jobs


def test_a_cancel_whose_answer_was_lost_answers_the_cancelled_job(batch_home: BatchHome) -> None:
    """The retry found the job CANCELLED by the first attempt: it answered FAILED_PRECONDITION "already ended",
    and `fashion batch cancel` exited 2 although the cancel worked."""
    write_images(batch_home.data / "cancel_me", 3)
    batch = batch_home.start(f"127.0.0.1:{free_port()}")  # nothing listens there: the job waits
    host, port = batch.address.rsplit(":", 1)
    proxy = AnswerLosingProxy((host, int(port)))
    try:
        with BatchClient(batch.address) as client:
            job = client.submit("cancel_me")
        with BatchClient(proxy.address) as client:
            cancelled = client.cancel(job.job_id)
        with BatchClient(batch.address) as client:
            again = client.cancel(job.job_id)  # and a second cancel by hand, answered the same way
    finally:
        proxy.close()
        batch.terminate()
    assert proxy.answers_lost == 1
    assert cancelled.state == again.state == pb.JOB_STATE_CANCELLED, (cancelled, again)
