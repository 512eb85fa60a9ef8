"""The ONNX Runtime session for one model folder."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from services.inference.model import ModelManifest

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(preference: str) -> list[str]:
    """CUDA first when asked for (or `auto`) and onnxruntime-gpu offers it; CPU always last."""
    available = ort.get_available_providers()
    if preference == "cuda" and CUDA not in available:
        raise RuntimeError(f"execution_provider=cuda but this onnxruntime offers only {available}")
    if preference in ("auto", "cuda") and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class OnnxModel:
    """Runs a batch of preprocessed images through the model; returns class probabilities."""

    def __init__(self, manifest: ModelManifest, execution_provider: str = "auto",
                 intra_op_threads: int = 0, inter_op_threads: int = 1) -> None:
        self.manifest = manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads would take the cores the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(execution_provider)
        path = manifest.model_path_for(providers[0])
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        log.info("Loaded %s v%s from %s with %s (intra-op threads %d)", manifest.name, manifest.version,
                 path, self.provider, options.intra_op_num_threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        if manifest.input_name not in inputs:
            raise ValueError(f"model.onnx has no input {manifest.input_name!r}; it has {sorted(inputs)}")
        outputs = [o.name for o in self.session.get_outputs()]
        if manifest.output_name not in outputs:
            raise ValueError(f"model.onnx has no output {manifest.output_name!r}; it has {outputs}")
        self._input = manifest.input_name
        self._outputs = [manifest.output_name]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    @property
    def num_classes(self) -> int:
        return len(self.manifest.labels)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, *input_shape) float32 -> (N, classes) float32 probabilities."""
        (out,) = self.session.run(self._outputs, {self._input: batch})
        if self.manifest.output_kind == "logits":
            out = softmax(out / self.manifest.temperature)
        return out

    def warm_up(self) -> None:
        """One inference on a blank image: proves the session works before readiness is claimed."""
        out = self.run(np.zeros((1, *self.input_shape), np.float32))
        if out.shape != (1, self.num_classes) or not np.all(np.isfinite(out)):
            raise RuntimeError(f"warm-up produced {out.shape}, expected (1, {self.num_classes}) finite values")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
