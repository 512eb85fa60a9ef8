"""Worker processes of the Inference service: image decoding (and, on the CPU, the model run) off
the service's GIL, driven from the event loop.

Decoding an image is mostly Python inside Pillow; done in the service process, every step
competes for the GIL with the event loop that serves the gRPC calls, and each image ends up
costing several times its decode (docs/performance.md has the measurements). A `WorkerPool`
(pool.py) keeps one worker process (process.py) per batch in flight. The event loop writes a batch
to an idle worker's socket and awaits the answer like any other I/O: no thread of the service takes
part, so a batch costs no GIL hand-off between threads. The workers run the same `Preprocessor` as
everything else (services/inference/decoding.py); what goes over the socket is wire.py's.

Given a model (`WorkerModel`), each worker also opens its own ONNX Runtime session on the CPU and
answers with the model's outputs: the batch (encoded images and KServe tensors alike) never comes
back into the service process, two batches run the model at once, one per worker on its share of
the cores, and the service process does nothing per batch but write the request and read the
probabilities.

The workers run at a lower CPU priority than the service (`nice`, 10 steps by default): the event
loop is the one stage every call passes through, and when it and a worker both want a core, the
loop should have it.

A worker that dies (a decoder crash on a hostile file, an OOM kill) is restarted and the batch
retried once in the new one; if that dies too, the batch's images fail with a clear reason and
the service goes on serving.
"""
