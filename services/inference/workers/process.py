"""A worker process of the Inference service (started by WorkerPool, not by hand):

    python -m services.inference.workers.process FD NICE

It reads its start message and then batches from the socket FD, decodes each batch's images (and,
given a model, runs the model on the batch), answers, and exits when the service closes the socket.
"""

from __future__ import annotations

import os
import sys
import time
from multiprocessing.connection import Connection

from services.inference.decoding import concat, decode_images, encoded_images, model_inputs, request_errors
from services.inference.workers import wire


def serve(fd: int) -> None:
    """Answer the batches that come over the socket `fd` until the service closes it."""
    conn = Connection(fd)
    prepare, spec = wire.read_start(conn.recv_bytes())
    model = None
    if spec is not None:
        from services.inference.engine import OnnxModel  # workers that only decode never load ONNX Runtime

        model = OnnxModel(spec.manifest, "cpu", intra_op_threads=spec.threads, onnx=spec.onnx)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the service closed the pool or is gone
        items, run_model = wire.read_batch(message)
        decoded = decode_images(prepare, encoded_images(items))
        failure = None
        if run_model and model is not None:
            pieces = model_inputs(items, decoded.rows, request_errors(items, decoded.errors))
            outputs = None
            t = time.perf_counter()
            try:
                if pieces:
                    outputs = model.run(concat(pieces))
            except Exception as exc:  # as in the service process: the whole batch fails with it
                failure = f"model run failed: {type(exc).__name__}: {exc}"
            decoded = decoded._replace(rows=outputs, compute_s=time.perf_counter() - t if pieces else None)
        conn.send_bytes(wire.reply_message(decoded, failure))


if __name__ == "__main__":
    import signal

    # Ctrl-C (or a SIGTERM to the process group) must not kill us under batches still draining:
    # we exit when the service closes our socket, or when it is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(int(sys.argv[2]))
    serve(int(sys.argv[1]))
