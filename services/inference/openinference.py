"""The model over the Open Inference Protocol (KServe V2), whichever transport carries it: what
ModelMetadata declares, how each request's input becomes the model's input, and the answer, with
Triton's classification extension. The gRPC servicer (kserve.py) only translates; the gateway's
REST v2 routes forward to it.

Inputs are in natural units, so that no client needs the model's manifest; a request carries
exactly one of them:

- `image` (the manifest's input name), UINT8 `[N, *input_shape]`: pixel values 0-255 in the
  model's layout and convention (Fashion-MNIST: a light item on a dark background, 28x28 gray);
- `image_fp32`, FP32, the same shape: those pixels / 255, in [0, 1];
- `image_bytes`, BYTES `[N]`: each element an encoded image file (JPEG, PNG, ...), preprocessed as
  fashion.v1 Classify does (product photos, EXIF orientation, decompression bombs refused).

The server applies the model's normalization ((x - mean) / std, from the manifest) itself, to
UINT8 by the same per-level table as the images of Classify, so every form gives the same answer
for the same pixels. The model's own normalized input stays reachable, explicitly only: FP32 to
`image_fp32` with the request parameter `normalized: true`. FP32 sent to `image` (what a client of
the old interface sends) is refused naming `image_fp32`, and FP32 outside [0, 1] is refused naming
the parameter: such a request never gets a confident answer computed from the wrong units.

Folding the normalization into the ONNX graphs instead would have changed the model files (a
re-quantization of the int8 one, whose calibration assumes normalized input), the Classify path's
preprocessing and every manifest-driven model folder; here it costs one table lookup per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fashion.kserve.v2 import grpc_service_pb2 as pb
from services.common import tensors
from services.common.tensors import BYTES, TensorError
from services.inference.model import ModelManifest
from services.inference.statistics import Duration, ModelStatistics

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("classification", "statistics")
"""Triton protocol extensions served over gRPC (the gateway adds binary_tensor_data over REST)."""
NORMALIZED = "normalized"
"""Request parameter: FP32 input already normalized with the model's mean and std."""
CLASSIFICATION = "classification"
"""Requested-output parameter (Triton's classification extension): the top k as strings."""
UINT8, FP32 = "UINT8", "FP32"


class ModelNotFound(LookupError):
    """The request names a model or version this server does not have."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """With -1 for the batch dimension."""

    def describe(self) -> str:
        return f"{self.name!r} ({self.datatype} {list(self.shape)})"


@dataclass(frozen=True)
class ModelRequest:
    """What one ModelInferRequest asks of the model: the model's input rows, or encoded images;
    and per requested output, 0 for the probabilities or k for the top-k classification strings."""

    rows: np.ndarray | None
    images: list[bytes] | None
    class_counts: tuple[int, ...]


class OpenInferenceModel:
    """The model of `manifest` as the Open Inference Protocol sees it."""

    def __init__(self, manifest: ModelManifest) -> None:
        self.manifest = manifest
        shape = (-1, *manifest.input_shape)
        name = manifest.input_name
        self.pixels = InputSpec(name, UINT8, shape)
        self.unit_range = InputSpec(f"{name}_fp32", FP32, shape)
        self.encoded = InputSpec(f"{name}_bytes", BYTES, (-1,))
        self.inputs = (self.pixels, self.unit_range, self.encoded)
        self._by_name = {spec.name: spec for spec in self.inputs}
        channels = manifest.channels
        mean = np.broadcast_to(np.asarray(manifest.mean, np.float32), (channels,))
        std = np.broadcast_to(np.asarray(manifest.std, np.float32), (channels,))
        # Per channel, pixel level -> normalized value: the table Classify's preprocessing uses.
        self._levels = ((np.arange(256, dtype=np.float32)[None, :] / 255 - mean[:, None]) / std[:, None]
                        ).astype(np.float32)
        self._channel_axis = 1 if manifest.layout == "NCHW" else 3
        broadcast = [1, 1, 1, 1]
        broadcast[self._channel_axis] = channels
        self._mean = mean.reshape(broadcast)
        self._std = std.reshape(broadcast)

    # --- requests ------------------------------------------------------------------------------
    def check(self, name: str, version: str) -> None:
        manifest = self.manifest
        if name != manifest.name:
            raise ModelNotFound(f"model {name!r} is not served here; this server has {manifest.name!r}")
        if version and version != manifest.version:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; it has {manifest.version!r}")

    def read(self, request: pb.ModelInferRequest) -> ModelRequest:
        """The request's one input as model input rows or images, and its requested outputs;
        TensorError says what does not fit."""
        names = " or ".join(repr(spec.name) for spec in self.inputs)
        if len(request.inputs) != 1:
            raise TensorError(f"expected exactly 1 input ({names}), got {len(request.inputs)}")
        tensor = request.inputs[0]
        spec = self._by_name.get(tensor.name)
        if spec is None:
            raise TensorError(f"unknown input {tensor.name!r}; the model takes one of "
                              f"{', '.join(s.describe() for s in self.inputs)}")
        normalized = self._normalized(request, spec)
        if tensor.datatype != spec.datatype:
            raise TensorError(self._wrong_datatype(spec, tensor.datatype))
        shape = [int(d) for d in tensor.shape]
        if spec is self.encoded:
            if len(shape) != 1:
                raise TensorError(f"input {spec.name!r} has shape {shape}; it takes [N], one encoded image "
                                  "file per element")
        elif len(shape) != len(spec.shape) or shape[1:] != list(spec.shape[1:]):
            raise TensorError(f"input {spec.name!r} has shape {shape}; the model takes {list(spec.shape)}")
        if shape[0] < 1:
            raise TensorError(f"input {spec.name!r} has shape {shape}: no images")
        if request.raw_input_contents:
            if tensor.HasField("contents"):  # which one would be meant? Triton refuses it too
                raise TensorError(f"input {spec.name!r} has both contents and raw_input_contents: send one")
            if len(request.raw_input_contents) != 1:
                raise TensorError(f"{len(request.raw_input_contents)} raw_input_contents for 1 input")
            data = tensors.from_raw(spec.name, spec.datatype, shape, request.raw_input_contents[0])
        else:
            data = tensors.from_contents(spec.name, spec.datatype, shape, tensor.contents)
        class_counts = self._class_counts(request)
        if isinstance(data, list):
            return ModelRequest(None, data, class_counts)
        return ModelRequest(self.model_rows(spec, data, normalized), None, class_counts)

    def model_rows(self, spec: InputSpec, data: np.ndarray, normalized: bool = False) -> np.ndarray:
        """`data` of input `spec` as the model's float32 input."""
        if spec is self.pixels:
            if len(self._levels) == 1:
                return self._levels[0].take(data)
            channels = [self._levels[c].take(np.take(data, c, self._channel_axis)) for c in range(len(self._levels))]
            return np.stack(channels, self._channel_axis)
        if data.dtype.kind == "f" and not np.isfinite(data).all():  # every float form, normalized too
            raise TensorError(f"input {spec.name!r} has non-finite values (NaN or infinity); it takes finite "
                              "numbers only")
        if normalized:
            return np.ascontiguousarray(data, np.float32)
        low, high = float(data.min()), float(data.max())
        if not (low >= 0.0 and high <= 1.0):  # NaN fails too
            raise TensorError(
                f"input {spec.name!r} takes pixel values in [0, 1] (pixels / 255); this one has values from "
                f"{low:g} to {high:g}. A tensor already normalized with the model's mean and std goes with the "
                f"request parameter {NORMALIZED}=true")
        return (data - self._mean) / self._std

    def _normalized(self, request: pb.ModelInferRequest, spec: InputSpec) -> bool:
        if NORMALIZED not in request.parameters:
            return False
        value = tensors.parameter_value(request.parameters[NORMALIZED])
        if not isinstance(value, bool):
            raise TensorError(f"parameter {NORMALIZED!r} must be a boolean, not {value!r}")
        if value and spec is not self.unit_range:
            raise TensorError(f"parameter {NORMALIZED}=true applies to FP32 input {self.unit_range.name!r} only")
        return value

    def _wrong_datatype(self, spec: InputSpec, datatype: str) -> str:
        why = f"input {spec.name!r} must be {spec.datatype}, not {datatype or 'unset'}"
        if spec is self.pixels and datatype == FP32:
            return (f"{why}: it takes pixel values 0-255. FP32 pixels / 255 in [0, 1] go to input "
                    f"{self.unit_range.name!r} (a tensor already normalized with the model's mean and std: "
                    f"{self.unit_range.name!r} with the request parameter {NORMALIZED}=true)")
        if spec is self.unit_range and datatype == UINT8:
            return f"{why}; UINT8 pixel values go to input {self.pixels.name!r}"
        if spec is self.encoded:
            return f"{why}: one encoded image file (JPEG, PNG, ...) per element"
        return why

    def _class_counts(self, request: pb.ModelInferRequest) -> tuple[int, ...]:
        if not request.outputs:
            return (0,)
        output = self.manifest.output_name
        counts = []
        for requested in request.outputs:
            if requested.name != output:
                raise TensorError(f"unknown output {requested.name!r}; the model has {output!r}")
            count = 0
            if CLASSIFICATION in requested.parameters:
                value = tensors.parameter_value(requested.parameters[CLASSIFICATION])
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise TensorError(f"output parameter {CLASSIFICATION!r} must be a class count >= 0, "
                                      f"not {value!r}")
                count = value
            counts.append(count)
        if len(counts) > 1:
            raise TensorError(f"output {output!r} requested {len(counts)} times; ask for it once")
        return tuple(counts)

    # --- answers -------------------------------------------------------------------------------
    def response(self, request: pb.ModelInferRequest, wanted: ModelRequest,
                 probs: np.ndarray) -> pb.ModelInferResponse:
        """The answer to `request`: per requested output the probabilities (FP32 [N, classes]) or,
        with a class count k, Triton's classification strings (BYTES [N, k], "score:index:label",
        best first)."""
        manifest = self.manifest
        outputs, raw = [], []
        for k in wanted.class_counts:
            if k:
                top = classification(probs, k, manifest.labels)
                outputs.append(pb.ModelInferResponse.InferOutputTensor(
                    name=manifest.output_name, datatype=BYTES, shape=list(top.shape)))
                raw.append(tensors.serialize_bytes(top.ravel().tolist()))
            else:
                outputs.append(pb.ModelInferResponse.InferOutputTensor(
                    name=manifest.output_name, datatype=FP32, shape=list(probs.shape)))
                raw.append(np.ascontiguousarray(probs, "<f4").tobytes())
        return pb.ModelInferResponse(model_name=manifest.name, model_version=manifest.version, id=request.id,
                                     outputs=outputs, raw_output_contents=raw)

    def metadata(self) -> pb.ModelMetadataResponse:
        manifest = self.manifest
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=manifest.name, versions=[manifest.version], platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in self.inputs],
            outputs=[tensor(name=manifest.output_name, datatype=FP32, shape=[-1, len(manifest.labels)])],
        )

    def statistics(self, stats: ModelStatistics) -> pb.ModelStatistics:
        manifest = self.manifest

        def duration(total: Duration) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=total.count, ns=total.ns)

        zero = Duration()
        return pb.ModelStatistics(
            name=manifest.name, version=manifest.version, last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count, execution_count=stats.execution_count,
            inference_stats=pb.InferStatistics(
                success=duration(stats.success), fail=duration(stats.fail), queue=duration(stats.queue),
                compute_input=duration(stats.compute_input), compute_infer=duration(stats.compute_infer),
                compute_output=duration(stats.compute_output), cache_hit=duration(zero),
                cache_miss=duration(zero)),
            batch_stats=[pb.InferBatchStatistics(
                batch_size=size, compute_input=duration(runs.compute_input),
                compute_infer=duration(runs.compute_infer), compute_output=duration(zero))
                for size, runs in sorted(stats.batches.items())],
        )


def classification(probs: np.ndarray, k: int, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification output: per row the top `k` as b"score:index:label" (the score
    with 6 decimals, as Triton prints it), best first; shape [N, min(k, classes)]."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(probs, order, axis=1)
    rows = [[f"{p:f}:{i}:{labels[i]}".encode() for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
            for row_p, row_i in zip(scores, order, strict=True)]
    out = np.empty((len(rows), k), object)
    out[:] = rows
    return out
