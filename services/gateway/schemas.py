"""The gateway's request and response bodies for the OpenAPI document: those of protobuf messages,
derived from their descriptors (`schema`) so that the documented shape cannot drift from what
fashion.client.protojson returns; and the others: /health and /stats as the monitoring guide reads
them (docs/monitoring-and-logging-guide.md), predictions, the job submission, and the Open Inference
Protocol's inference request and response."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import BaseModel, Field, create_model

from fashion.client.protojson import enum_name
from services.gateway.errors import ErrorDetail


class Health(BaseModel):
    """The REST API's /health, field for field."""

    status: Literal["healthy", "unhealthy"]
    model_loaded: bool
    classes: int
    timestamp: str = Field(examples=["2025-10-07T12:00:00"])


class ApiStats(BaseModel):
    """The REST API's /stats, field for field (counters of the Inference service since its start)."""

    uptime_seconds: int
    uptime_human: str = Field(examples=["1:00:00"])
    total_requests: int
    total_images_processed: int
    successful_predictions: int
    failed_predictions: int
    success_rate: float = Field(examples=[97.93])
    model_loaded: bool
    timestamp: str = Field(examples=["2025-10-07T12:00:00"])


class TopCategory(BaseModel):
    label: str
    index: int
    confidence: float


class Prediction(BaseModel):
    filename: str | None
    category: str
    confidence: float
    uncertain: bool
    """True when confidence is under the model's threshold: probably not a fashion item."""
    top_k: list[TopCategory]
    model_name: str
    model_version: str
    latency_ms: float
    """Server-side time of the Inference service for this image."""


class BatchItem(BaseModel):
    """One image of a batch: the prediction fields, or `error` when this image could not be used."""

    filename: str | None
    category: str | None = None
    confidence: float | None = None
    uncertain: bool | None = None
    top_k: list[TopCategory] = []
    error: ErrorDetail | None = None


class BatchPrediction(BaseModel):
    results: list[BatchItem]
    model_name: str
    model_version: str
    latency_ms: float


class SubmitJob(BaseModel):
    """A batch job: sort the images of a folder (under the Batch service's data root) into category folders."""

    input_dir: str = Field(min_length=1, examples=["inbox"])
    mode: Literal["move", "copy"] | None = None
    """move (the default) or copy."""
    min_confidence: float | None = Field(default=None, ge=0, le=1)
    """Results below it go to _uncertain/; unset: the model's default."""
    recursive: bool = False
    output_dir: str = ""
    """Where the category folders go (under the data root); default processed_batches."""
    idempotency_key: str = ""
    """Submitting twice with the same key returns the first job."""


# --- The Open Inference Protocol's REST bodies (POST /v2/models/{name}/infer) --------------------
Parameters = dict[str, bool | int | float | str]


class InferInputTensor(BaseModel):
    name: str = Field(examples=["image"])
    """`image` (UINT8 pixels 0-255), `image_fp32` (FP32 in [0, 1]) or `image_bytes` (BYTES, encoded
    image files): see GET /v2/models/{name}."""
    shape: list[int] = Field(examples=[[1, 1, 28, 28]])
    datatype: str = Field(examples=["UINT8"])
    parameters: Parameters | None = None
    """`binary_data_size`: this input's bytes in the binary data after the JSON header, instead of `data`."""
    data: list[Any] | None = None
    """The elements, flat or nested, in row-major order (BYTES: strings)."""


class InferRequestedOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: Parameters | None = None
    """`classification`: k, for the top k as "score:index:label" strings (BYTES); `binary_data`:
    answer this output as binary data after the JSON header."""


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = None
    """`binary_data_output`: every output as binary data; `normalized`: FP32 input already
    normalized with the model's mean and std."""
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    """`binary_data_size`: this output's bytes in the binary data after the JSON header."""
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[InferOutputTensor]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested models written in place (for a hand-written requestBody)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


# --- protobuf messages ---------------------------------------------------------------------------

_TIMESTAMP = "google.protobuf.Timestamp"


def _python_type(field: FieldDescriptor) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == _TIMESTAMP:
            return str
        return schema(field.message_type)
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = tuple(enum_name(field.enum_type, v.number) for v in field.enum_type.values)
        return Literal[names]  # type: ignore[valid-type]
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool
    if field.type == FieldDescriptor.TYPE_STRING:
        return str
    if field.type == FieldDescriptor.TYPE_BYTES:
        return None
    return int


@cache
def schema(desc: Descriptor) -> type[BaseModel]:
    """A pydantic model describing fashion.client.protojson.to_json's output for messages of `desc`."""
    fields: dict[str, Any] = {}
    for field in desc.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            kind: Any = dict[str, _python_type(field.message_type.fields_by_name["value"])]  # type: ignore[misc]
        elif field.is_repeated:
            kind = list[_python_type(field)]  # type: ignore[misc]
        else:
            kind = _python_type(field)
            nullable = field.type == FieldDescriptor.TYPE_MESSAGE or field.has_presence
            if nullable:
                kind = kind | None
        fields[field.name] = (kind, Field(...))
    return create_model(desc.name, __doc__=f"{desc.file.package} {desc.name}", **fields)
