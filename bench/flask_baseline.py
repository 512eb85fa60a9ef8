"""The baseline that the seed's design implies: a plain Flask app under gunicorn (2 sync workers),
each request decoding, preprocessing and running ONNX Runtime on its one image, in the worker.

Same model folder and the same preprocessing code as the Inference service, so that the
difference measured is the serving design (dynamic batching, async I/O), not the model.

    FLASK_BASELINE_MODEL_DIR=... gunicorn -w 2 -b 127.0.0.1:8000 'bench.flask_baseline:create_app()'
"""

from __future__ import annotations

import os
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
    # A plain app keeps ONNX Runtime's defaults (a thread per core in each worker, as the seed did);
    # FLASK_BASELINE_THREADS=1 is the tuned variant the benchmark reports beside it.
    options.intra_op_num_threads = int(os.environ.get("FLASK_BASELINE_THREADS", "0"))
    session = ort.InferenceSession(str(manifest.model_path), options, providers=["CPUExecutionProvider"])
    labels = manifest.labels
    app = Flask(__name__)

    @app.post("/predict")
    def predict():  # type: ignore[no-untyped-def]
        upload = request.files.get("file")
        if upload is None:
            return jsonify(error="no file"), 400
        try:
            x = pre(upload.read())
        except ImageRejected as exc:
            return jsonify(error=str(exc)), 400
        probs = session.run([manifest.output_name], {manifest.input_name: x[None]})[0][0]
        if manifest.output_kind == "logits":
            e = np.exp(probs - probs.max())
            probs = e / e.sum()
        order = np.argsort(-probs)[:3]
        return jsonify(category=labels[order[0]], confidence=float(probs[order[0]]),
                       top_k=[{"label": labels[i], "confidence": float(probs[i])} for i in order])

    return app
