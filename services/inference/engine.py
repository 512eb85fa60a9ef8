"""The ONNX Runtime session for one model folder."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from services.inference.cpus import machine_cpus
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


def _with_options(provider: str) -> str | tuple[str, dict[str, str]]:
    if provider == CUDA:
        # cuDNN's exhaustive search (ONNX Runtime's default) benchmarks every convolution algorithm
        # for each new input shape, and a dynamic batcher makes a new shape of every batch size:
        # the heuristic starts each new size many times faster, and its steady runs are as fast.
        # TF32 (ONNX Runtime's default on Ampere and newer) rounds float32 matrix products to 10-bit
        # mantissas: results would differ from the CPU's in the third decimal. Full float32 costs
        # this model nothing measurable.
        return CUDA, {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
    return provider


def preload_cuda_libraries() -> None:
    """onnxruntime-gpu[cuda,cudnn] brings CUDA and cuDNN as nvidia-* wheels, outside the dynamic
    loader's search path: load them before the CUDA provider looks (a system-wide CUDA needs nothing)."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # the libraries may come from the system instead: let ONNX Runtime say
            log.warning("Could not preload CUDA libraries from the nvidia-* wheels: %s", exc)


class OnnxModel:
    """Runs a batch of preprocessed images through the model; returns class probabilities."""

    def __init__(self, manifest: ModelManifest, execution_provider: str = "auto",
                 intra_op_threads: int = 0, inter_op_threads: int = 1, cuda_batch: int = 0,
                 onnx: bytes | None = None) -> None:
        """`onnx`: the model file's contents as read before (None: read now).
        `cuda_batch`: on CUDA, smaller batches are padded to this many rows (0: not padded).
        There a change of input shape costs more than the rows: ONNX Runtime's convolutions set
        up cuDNN again whenever the batch size differs from the last run's (docs/performance.md
        has the measurements). `intra_op_threads` 0: one per CPU the container may use (its CPU
        limit, not the node's cores: services.common.cpus.available_cpus)."""
        self.manifest = manifest
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or machine_cpus()
        options.inter_op_num_threads = inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads would take the cores the event loop needs between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = choose_providers(execution_provider)
        if providers[0] == CUDA:
            preload_cuda_libraries()
        path = manifest.model_path_for(providers[0])
        # Read once and kept: the worker processes' sessions, started and restarted later, run these
        # same bytes, whatever happens to the file meanwhile (replaced, truncated, made unreadable).
        self.onnx = path.read_bytes() if onnx is None else onnx
        self.session = ort.InferenceSession(self.onnx, options, providers=[_with_options(p) for p in providers])
        self.provider = self.session.get_providers()[0]
        self.intra_op_threads = options.intra_op_num_threads
        if execution_provider == "cuda" and self.provider != CUDA:
            # ONNX Runtime falls back to the CPU when the CUDA provider cannot load (its log says why).
            raise RuntimeError("execution_provider=cuda but ONNX Runtime could not start its CUDA provider "
                               f"(session providers: {self.session.get_providers()}); see the log above")
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
        self.pad_to = cuda_batch if self.provider == CUDA else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    @property
    def num_classes(self) -> int:
        return len(self.manifest.labels)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, *input_shape) float32 -> (N, classes) float32 probabilities."""
        n = len(batch)
        if n < self.pad_to:
            batch = np.concatenate([batch, np.zeros((self.pad_to - n, *batch.shape[1:]), batch.dtype)])
        (out,) = self.session.run(self._outputs, {self._input: batch})
        out = out[:n]
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
