"""The Open Inference Protocol's REST bodies to and from its gRPC messages, for the gateway's
`/v2` routes, which forward to the Inference service's KServe V2 gRPC API: one implementation of
the protocol, in the service; here only its REST encoding.

Request bodies are JSON, or, with Triton's binary tensor data extension, a JSON header of
`Inference-Header-Content-Length` bytes followed by each input's raw data whose size its
`parameters.binary_data_size` gives, in input order. Outputs are answered as JSON `data`, or as
binary data after the JSON header where the request asks (`parameters.binary_data` of an output,
`parameters.binary_data_output` of the request). Bodies may be gzip- or deflate-compressed
(Content-Encoding), and answers are when the client accepts it (Accept-Encoding), as Triton does.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from fashion.kserve.v2 import grpc_service_pb2 as pb
from services.common import tensors
from services.common.tensors import TensorError

HEADER_LENGTH = "inference-header-content-length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
REST_EXTENSIONS = ("binary_tensor_data",)
"""Extensions the REST side adds to those of the Inference service."""
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # the range of a shape dimension (int64 in the gRPC message)


class BodyTooLarge(ValueError):
    """A compressed body that inflates past the limit."""


@dataclass
class BinaryOutputs:
    """Which outputs to answer as binary data: `default` unless named in `by_name`."""

    default: bool = False
    by_name: dict[str, bool] = field(default_factory=dict)

    def __call__(self, name: str) -> bool:
        return self.by_name.get(name, self.default)


def decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """`body` as sent before its Content-Encoding (gzip, deflate or none), at most `limit` bytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise TensorError(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise TensorError(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"the request body inflates to over the limit of {limit} bytes")
    if not inflater.eof:
        raise TensorError(f"the {encoding} body is truncated")
    if inflater.unused_data:
        # Concatenated gzip members or trailing garbage: refused rather than silently dropped.
        raise TensorError(f"the {encoding} body has {len(inflater.unused_data)} bytes after the end of its "
                          f"compressed data; send one {encoding} stream")
    return out


def compressed(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """`body` compressed as the client accepts (the higher q-value; gzip before deflate at equal ones;
    q=0: not acceptable), and its Content-Encoding."""
    weights = accepted_encodings(accept_encoding)
    wildcard = weights.get("*", 0.0)
    gzip_q, deflate_q = weights.get("gzip", wildcard), weights.get("deflate", wildcard)
    if gzip_q > 0 and gzip_q >= deflate_q:
        return gzip.compress(body, compresslevel=1), "gzip"
    if deflate_q > 0:
        return zlib.compress(body, 1), "deflate"
    return body, None


def accepted_encodings(accept_encoding: str | None) -> dict[str, float]:
    """Accept-Encoding as {coding: q-value} (RFC 9110 12.5.3); an unreadable q-value counts as 0."""
    weights: dict[str, float] = {}
    for part in (accept_encoding or "").split(","):
        coding, *params = (p.strip() for p in part.split(";"))
        if not coding:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0.0 <= q <= 1.0 else 0.0  # also refuses nan
        weights[coding.lower()] = q
    return weights


def infer_request(model: str, version: str, body: bytes,
                  header_length: int | None) -> tuple[pb.ModelInferRequest, BinaryOutputs]:
    """A REST inference request as a gRPC ModelInferRequest (every input as raw data), and which
    outputs the client wants as binary data. `header_length`: Inference-Header-Content-Length, the
    JSON's length when binary data follows it. TensorError says what does not parse."""
    binary = b""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise TensorError(f"Inference-Header-Content-Length {header_length} is past the end of the "
                              f"{len(body)}-byte body")
        body, binary = body[:header_length], body[header_length:]
    try:
        header = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TensorError(f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:
        raise TensorError("the inference request's JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise TensorError("the inference request must be a JSON object")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=_string(header, "id"))
    parameters = _object(header, "parameters", "request")
    outputs = BinaryOutputs(default=_flag(parameters.pop(BINARY_DATA_OUTPUT, False), BINARY_DATA_OUTPUT))
    _copy_parameters(parameters, request.parameters)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise TensorError("the inference request needs `inputs`: a non-empty array of tensors")
    offset = 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise TensorError(f"inputs[{i}] must be a JSON object")
        name = _string(tensor, "name", f"inputs[{i}]'s ") or f"inputs[{i}]"
        datatype = _string(tensor, "datatype", f"input {name!r}'s ")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise TensorError(f"input {name!r} needs `shape`: an array of integers")
        if not all(INT64_MIN <= d <= INT64_MAX for d in shape):
            raise TensorError(f"input {name!r} has shape {shape}: dimensions must fit in a 64-bit integer")
        tensor_parameters = _object(tensor, "parameters", f"input {name!r}")
        size = tensor_parameters.pop(BINARY_DATA_SIZE, None)
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
        _copy_parameters(tensor_parameters, entry.parameters)
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise TensorError(f"input {name!r}: {BINARY_DATA_SIZE} must be a byte count, not {size!r}")
            if "data" in tensor:
                raise TensorError(f"input {name!r} has both `data` and {BINARY_DATA_SIZE}")
            if offset + size > len(binary):
                raise TensorError(f"input {name!r}: {BINARY_DATA_SIZE} {size} goes past the end of the binary data "
                                  f"({len(binary) - offset} bytes left; Inference-Header-Content-Length "
                                  f"{'missing' if header_length is None else header_length})")
            request.raw_input_contents.append(binary[offset: offset + size])
            offset += size
        elif "data" in tensor:
            try:
                request.raw_input_contents.append(tensors.from_json(name, datatype, shape, tensor["data"]))
            except UnicodeEncodeError:
                raise TensorError(f"input {name!r}: BYTES `data` holds a string that is not valid Unicode "
                                  "(a lone surrogate)") from None
        else:
            raise TensorError(f"input {name!r} has neither `data` nor parameters.{BINARY_DATA_SIZE}")
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} bytes of binary data after the inputs' "
                          f"{BINARY_DATA_SIZE} ({offset} bytes) are accounted for")
    requested = header.get("outputs", [])
    if not isinstance(requested, list):
        raise TensorError("`outputs` must be an array")
    for i, output in enumerate(requested):
        if not isinstance(output, dict):
            raise TensorError(f"outputs[{i}] must be a JSON object")
        name = _string(output, "name", f"outputs[{i}]'s ")
        output_parameters = _object(output, "parameters", f"output {name!r}")
        if BINARY_DATA in output_parameters:
            outputs.by_name[name] = _flag(output_parameters.pop(BINARY_DATA), BINARY_DATA)
        _copy_parameters(output_parameters, request.outputs.add(name=name).parameters)
    return request, outputs


def infer_response(response: pb.ModelInferResponse, binary: BinaryOutputs) -> tuple[bytes, int | None]:
    """The REST body of a gRPC ModelInferResponse, and the length of its JSON header when binary
    data follows it (None: the body is all JSON)."""
    outputs = []
    data = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = {name: tensors.parameter_value(p) for name, p in tensor.parameters.items()}
        if binary(tensor.name):
            parameters[BINARY_DATA_SIZE] = len(raw)
            data.append(raw)
        else:
            entry["data"] = tensors.to_json(tensor.datatype, tensor.shape, raw)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = {name: tensors.parameter_value(p) for name, p in response.parameters.items()}
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not data:
        return header, None
    return b"".join([header, *data]), len(header)


def _string(obj: dict[str, Any], key: str, owner: str = "") -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise TensorError(f"{owner}`{key}` must be a string, not {value!r}")
    return _text(value, f"{owner}`{key}`")


def _text(value: str, what: str) -> str:
    """`value`, if protobuf can carry it: JSON's \\ud800 escapes decode to lone surrogates, which
    are not valid UTF-8 and which protobuf's string fields refuse."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise TensorError(f"{what} is not valid Unicode text (it holds a lone surrogate): {value!r}") from None
    return value


def _object(obj: dict[str, Any], key: str, owner: str) -> dict[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise TensorError(f"the {owner}'s `{key}` must be a JSON object")
    return dict(value)


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TensorError(f"parameter {name!r} must be true or false, not {value!r}")
    return value


def _copy_parameters(parameters: dict[str, Any], into: Any) -> None:
    for name, value in parameters.items():
        _text(name, f"parameter name {name!r}")
        if isinstance(value, str):
            _text(value, f"parameter {name!r}")
        into[name].CopyFrom(pb.InferParameter(**tensors.parameter_fields(name, value)))
