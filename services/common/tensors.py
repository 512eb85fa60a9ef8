"""Open Inference Protocol (KServe V2) tensors on the wire, for the Inference service's gRPC
servicer and the gateway's REST routes alike: datatypes, raw little-endian bytes, BYTES elements
(each a 4-byte little-endian length and its bytes), typed `contents`, JSON `data`, and parameters.

Transport-free: every problem raises TensorError, whose message names the tensor and says what
is wrong, for the caller to read (gRPC INVALID_ARGUMENT, HTTP 400). The generated KServe messages
are only read here, never imported: a process may hold tritonclient's protos, which register the
same `inference.*` names (tests do, and so may our users' programs).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fashion.kserve.v2 import grpc_service_pb2 as pb

BYTES = "BYTES"
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {name: np.dtype(code) for name, code in {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}.items()}
DATATYPES = (*NUMPY_DTYPES, BYTES)
# The typed `contents` field that carries each datatype (the narrow integers widened).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents",
}
_LENGTH = struct.Struct("<I")

Tensor = np.ndarray | list[bytes]
"""A decoded tensor: an array of its shape, or, for BYTES, its elements in row-major order."""


class TensorError(ValueError):
    """A tensor that does not parse or does not fit; the message says which and why."""


def element_count(name: str, shape: Sequence[int]) -> int:
    """The number of elements of `shape`; TensorError unless every dimension is given and >= 0."""
    if any(int(d) < 0 for d in shape):
        raise TensorError(f"input {name!r} has shape {list(shape)}: every dimension must be given (no -1)")
    return math.prod(int(d) for d in shape)


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as raw tensor data: a 4-byte little-endian length before each."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    """Raw BYTES tensor data back into its `count` elements."""
    elements: list[bytes] = []
    view = memoryview(raw)
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"input {name!r}: BYTES element {len(elements)} is cut off in its 4-byte length")
        (length,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + length > len(raw):
            raise TensorError(f"input {name!r}: BYTES element {len(elements)} declares {length} bytes, "
                              f"only {len(raw) - at} follow")
        elements.append(bytes(view[at: at + length]))
        at += length
    if len(elements) != count:
        raise TensorError(f"input {name!r} has {len(elements)} BYTES elements; its shape needs {count}")
    return elements


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"input {name!r} has datatype {datatype or 'unset'!r}; "
                          f"the protocol's datatypes are {', '.join(DATATYPES)}")
    return dtype


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> Tensor:
    """A tensor from its raw data (gRPC raw_input_contents, REST binary data)."""
    count = element_count(name, shape)
    if datatype == BYTES:
        return deserialize_bytes(name, raw, count)
    dtype = _dtype(name, datatype)
    if len(raw) != count * dtype.itemsize:
        raise TensorError(f"input {name!r} has {len(raw)} bytes of raw data; {datatype} {list(shape)} needs "
                          f"{count * dtype.itemsize}")
    return np.frombuffer(raw, dtype).reshape([int(d) for d in shape])


def from_contents(name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents) -> Tensor:
    """A tensor from typed `contents` (the field of its datatype)."""
    count = element_count(name, shape)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        _dtype(name, datatype)  # an unknown datatype says so
        raise TensorError(f"input {name!r}: {datatype} data can only be sent as raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(f"input {name!r} has {len(values)} {field}; {datatype} {list(shape)} needs {count}")
    if datatype == BYTES:
        return list(values)
    dtype = _dtype(name, datatype)
    wide = np.asarray(values)
    array = wide.astype(dtype)
    if dtype.kind in "iu" and wide.size and np.any(array != wide):
        raise TensorError(f"input {name!r}: {field} holds values outside the range of {datatype}")
    return array.reshape([int(d) for d in shape])


def from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> bytes:
    """REST JSON `data` (flat or nested, row-major) as raw tensor data."""
    count = element_count(name, shape)
    if not isinstance(data, list):
        raise TensorError(f"input {name!r}: `data` must be a JSON array, not {type(data).__name__}")
    if datatype == BYTES:
        flat = _flatten(name, data)
        if len(flat) != count:
            raise TensorError(f"input {name!r} has {len(flat)} elements in `data`; {list(shape)} needs {count}")
        if not all(isinstance(e, str) for e in flat):
            raise TensorError(f"input {name!r}: BYTES `data` elements must be strings (send files as binary data)")
        return serialize_bytes([e.encode() for e in flat])
    dtype = _dtype(name, datatype)
    try:
        wide = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        wide = np.asarray(None, object)
    if wide.dtype.kind not in "biuf" or wide.size != count:
        raise TensorError(f"input {name!r}: `data` is not a regular array of {count} {datatype} numbers "
                          f"({list(shape)})")
    if wide.size:
        if dtype.kind == "b" and wide.dtype.kind != "b":
            raise TensorError(f"input {name!r}: BOOL `data` must be true or false")
        if dtype.kind in "iu":
            if wide.dtype.kind not in "iu":
                raise TensorError(f"input {name!r}: {datatype} `data` must be integers")
            info = np.iinfo(dtype)
            if wide.min() < info.min or wide.max() > info.max:
                raise TensorError(f"input {name!r}: `data` holds values outside {datatype}'s range "
                                  f"[{info.min}, {info.max}]")
        if dtype.kind == "f" and wide.dtype.kind not in "iuf":
            raise TensorError(f"input {name!r}: {datatype} `data` must be numbers")
    return np.ascontiguousarray(wide, dtype).tobytes()


def _flatten(name: str, data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > 32:
                    raise TensorError(f"input {name!r}: `data` is nested too deeply")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def to_json(datatype: str, shape: Sequence[int], raw: bytes) -> list[Any]:
    """Raw output data as REST JSON `data` (flat, row-major; BYTES elements as UTF-8 strings)."""
    count = math.prod(int(d) for d in shape)
    if datatype == BYTES:
        return [e.decode("utf-8", "replace") for e in deserialize_bytes("output", raw, count)]
    return np.frombuffer(raw, NUMPY_DTYPES[datatype]).tolist()


def parameter_value(parameter: pb.InferParameter) -> bool | int | float | str | None:
    """The value an InferParameter holds (None: unset)."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def parameter_fields(name: str, value: Any) -> dict[str, Any]:
    """A JSON parameter value as InferParameter's fields (`InferParameter(**fields)`); TensorError
    for what the protocol can not carry."""
    if isinstance(value, bool):
        return {"bool_param": value}
    if isinstance(value, int):
        if -(1 << 63) <= value < 1 << 63:
            return {"int64_param": value}
        if 0 <= value < 1 << 64:
            return {"uint64_param": value}
    elif isinstance(value, float):
        return {"double_param": value}
    elif isinstance(value, str):
        return {"string_param": value}
    raise TensorError(f"parameter {name!r} must be a boolean, integer, number or string, not {value!r}")
