"""The baseline that the design in the monitoring guide (docs/monitoring-and-logging-guide.md)
implies: a plain Flask app under gunicorn (2 sync workers), each request decoding, preprocessing
and running ONNX Runtime on its one image, in the worker, and logging it as the guide's API does:
every request and response to logs/api.log, errors to logs/api_errors.log (stdlib rotating
handlers, 10 MB x 10), with the /stats counters.

Same model folder and the same preprocessing code as the Inference service, so that the
difference measured is the serving design (dynamic batching, async I/O), not the model.

    FLASK_BASELINE_MODEL_DIR=... FLASK_BASELINE_LOG_DIR=... \
        gunicorn -w 2 -b 127.0.0.1:8000 'bench.flask_baseline:create_app()'
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request

from services.inference.imaging import ImageRejected, Preprocessor
from services.inference.model import ModelManifest


def create_app(model_dir: str | None = None) -> Flask:
    manifest = ModelManifest.load(Path(model_dir or os.environ["FLASK_BASELINE_MODEL_DIR"]))
    pre = Preprocessor.from_manifest(manifest)
    options = ort.SessionOptions()
    # A plain app keeps ONNX Runtime's defaults (a thread per core in each worker, as the guide's API does);
    # FLASK_BASELINE_THREADS=1 is the tuned variant the benchmark reports beside it.
    options.intra_op_num_threads = int(os.environ.get("FLASK_BASELINE_THREADS", "0"))
    session = ort.InferenceSession(str(manifest.model_path), options, providers=["CPUExecutionProvider"])
    labels = manifest.labels
    log = _api_logger(Path(os.environ.get("FLASK_BASELINE_LOG_DIR", "logs")))
    stats = {"total_requests": 0, "total_images_processed": 0, "successful_predictions": 0, "failed_predictions": 0}
    app = Flask(__name__)

    @app.post("/predict")
    def predict():  # type: ignore[no-untyped-def]
        began = time.perf_counter()
        stats["total_requests"] += 1
        upload = request.files.get("file")
        log.info("Request: POST /predict from %s, file %s", request.remote_addr, upload and upload.filename)
        if upload is None:
            log.error("Prediction failed: no file")
            return jsonify(error="no file"), 400
        stats["total_images_processed"] += 1
        try:
            x = pre(upload.read())
        except ImageRejected as exc:
            stats["failed_predictions"] += 1
            log.error("Prediction failed: %s", exc)
            return jsonify(error=str(exc)), 400
        probs = session.run([manifest.output_name], {manifest.input_name: x[None]})[0][0]
        if manifest.output_kind == "logits":
            e = np.exp(probs - probs.max())
            probs = e / e.sum()
        order = np.argsort(-probs)[:3]
        stats["successful_predictions"] += 1
        log.info("Response: 200 %s (%.4f) in %.1f ms", labels[order[0]], probs[order[0]],
                 (time.perf_counter() - began) * 1000)
        return jsonify(category=labels[order[0]], confidence=float(probs[order[0]]),
                       top_k=[{"label": labels[i], "confidence": float(probs[i])} for i in order])

    return app


def _api_logger(folder: Path) -> logging.Logger:
    folder.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("flask_baseline.api")
    log.setLevel(logging.INFO)
    log.propagate = False
    formatter = logging.Formatter("[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    for name, level in (("api.log", logging.INFO), ("api_errors.log", logging.ERROR)):
        handler = logging.handlers.RotatingFileHandler(folder / name, maxBytes=10 * 1024 * 1024, backupCount=10)
        handler.setLevel(level)
        handler.setFormatter(formatter)
        log.addHandler(handler)
    return log
