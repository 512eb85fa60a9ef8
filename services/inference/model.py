"""A model folder: `model.onnx` plus `manifest.json` that says how to feed it.

manifest.json (all keys but `labels` optional, defaults shown)::

    {
      "name": "fashion-mnist-cnn",            # reported by GetModelInfo and KServe
      "version": "1",
      "description": "",
      "file": "model.onnx",                     # what runs on CPU
      "gpu_file": null,                         # optional: what runs on CUDA instead (e.g. the float
                                                # original of an int8 model.onnx)
      "labels": ["T-shirt/top", ...],           # one per output column
      "input":  {"name": "image", "shape": [1, 28, 28], "layout": "NCHW", "datatype": "FP32"},
      "output": {"name": "probabilities", "kind": "probabilities"},   # or "logits"
      "color_mode": "L",                        # "L" or "RGB"
      "normalization": {"mean": [0.0], "std": [1.0]},  # applied to pixels scaled to [0, 1]
      "background": "dark",                     # the model wants light items on dark ("dark") or the reverse
      "temperature": 1.0,                       # divides logits before softmax (kind "logits" only)
      "min_confidence": 0.5                     # below it a result is "uncertain"
    }

`input.shape` leaves out the batch dimension, which is dynamic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST_NAME = "manifest.json"


class ModelFolderError(ValueError):
    """The model folder is missing a file or its manifest is malformed."""


@dataclass(frozen=True)
class ModelManifest:
    folder: Path
    labels: tuple[str, ...]
    name: str = "model"
    version: str = "1"
    description: str = ""
    file: str = "model.onnx"
    gpu_file: str | None = None
    input_name: str = "image"
    input_shape: tuple[int, int, int] = (1, 28, 28)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    output_name: str = "probabilities"
    output_kind: Literal["probabilities", "logits"] = "probabilities"
    color_mode: Literal["L", "RGB"] = "L"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    background: Literal["dark", "light"] = "dark"
    temperature: float = 1.0
    min_confidence: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def model_path(self) -> Path:
        return self.folder / self.file

    def model_path_for(self, provider: str) -> Path:
        """The ONNX file to run on `provider`: gpu_file on CUDA when the folder has one."""
        if provider == "CUDAExecutionProvider" and self.gpu_file:
            return self.folder / self.gpu_file
        return self.model_path

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    @property
    def height(self) -> int:
        return self.input_shape[1] if self.layout == "NCHW" else self.input_shape[0]

    @property
    def width(self) -> int:
        return self.input_shape[2] if self.layout == "NCHW" else self.input_shape[1]

    @classmethod
    def load(cls, folder: Path | str) -> ModelManifest:
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelFolderError(f"model folder {folder} has no {MANIFEST_NAME}") from exc
        except json.JSONDecodeError as exc:
            raise ModelFolderError(f"{path} is not valid JSON: {exc}") from exc
        manifest = cls.from_dict(folder, raw)
        for name in filter(None, (manifest.file, manifest.gpu_file)):
            if not (folder / name).is_file():
                raise ModelFolderError(f"model folder {folder} has no {name}")
        return manifest

    @classmethod
    def from_dict(cls, folder: Path, raw: dict[str, Any]) -> ModelManifest:
        labels = raw.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ModelFolderError("manifest needs `labels`: a non-empty list of strings")
        inp = raw.get("input", {})
        out = raw.get("output", {})
        norm = raw.get("normalization", {})
        color_mode = raw.get("color_mode", "L")
        if color_mode not in ("L", "RGB"):
            raise ModelFolderError(f"color_mode must be 'L' or 'RGB', not {color_mode!r}")
        layout = inp.get("layout", "NCHW")
        if layout not in ("NCHW", "NHWC"):
            raise ModelFolderError(f"input.layout must be NCHW or NHWC, not {layout!r}")
        shape = tuple(int(d) for d in inp.get("shape", (1, 28, 28)))
        if len(shape) != 3:
            raise ModelFolderError(f"input.shape must have 3 dimensions (no batch), not {list(shape)}")
        channels = 1 if color_mode == "L" else 3
        if (shape[0] if layout == "NCHW" else shape[2]) != channels:
            raise ModelFolderError(f"input.shape {list(shape)} does not match color_mode {color_mode}")
        mean = tuple(float(v) for v in norm.get("mean", [0.0] * channels))
        std = tuple(float(v) for v in norm.get("std", [1.0] * channels))
        if len(mean) not in (1, channels) or len(std) not in (1, channels) or min(std) <= 0:
            raise ModelFolderError("normalization mean/std must have 1 or one-per-channel positive values")
        known = {"name", "version", "description", "file", "gpu_file", "labels", "input", "output", "normalization",
                 "color_mode", "background", "temperature", "min_confidence"}
        return cls(
            folder=folder,
            labels=tuple(labels),
            name=str(raw.get("name", folder.name)),
            version=str(raw.get("version", "1")),
            description=str(raw.get("description", "")),
            file=str(raw.get("file", "model.onnx")),
            gpu_file=str(raw["gpu_file"]) if raw.get("gpu_file") else None,
            input_name=str(inp.get("name", "image")),
            input_shape=shape,  # type: ignore[arg-type]
            layout=layout,
            output_name=str(out.get("name", "probabilities")),
            output_kind=out.get("kind", "probabilities"),
            color_mode=color_mode,
            mean=mean,
            std=std,
            background=raw.get("background", "dark"),
            temperature=float(raw.get("temperature", 1.0)),
            min_confidence=float(raw.get("min_confidence", 0.5)),
            extra={k: v for k, v in raw.items() if k not in known},
        )
