"""Triton's binary tensor data extension for the V2 REST protocol.

Request: the first ``Inference-Header-Content-Length`` bytes are the JSON header; the
rest is the raw data of the inputs whose parameters carry ``binary_data_size``, in order.
Response: outputs asked for in binary carry ``binary_data_size`` instead of ``data`` and
their bytes follow the JSON. BYTES elements are 4-byte little-endian length + bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from app.errors import BadRequestError, json_error_message

HEADER = "inference-header-content-length"
NUMPY_TYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
               "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
               "UINT16": np.uint16}


def split_body(body: bytes, header_length: str | None) -> tuple[object, bytes]:
    """(parsed JSON header, trailing binary data)."""
    if header_length is None:
        cut = len(body)
    elif (header_length.isascii() and header_length.isdigit()  # not '²': int() refuses it
          and len(header_length) <= 20 and int(header_length) <= len(body)):
        cut = int(header_length)
    else:
        raise BadRequestError(f"Inference-Header-Content-Length {header_length!r} does not fit "
                              f"a {len(body)}-byte body")
    try:
        return json.loads(body[:cut]), body[cut:]
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError,
        # json's refusal of integers over 4,300 digits (a plain ValueError), deep nesting
        raise BadRequestError(json_error_message(exc)) from None


def attach_binary_inputs(request: Mapping[str, object], blob: bytes) -> list[bytes | None]:
    """Per input: its binary payload (bytes) or None when the data is inline JSON."""
    payloads: list[bytes | None] = []
    offset = 0
    inputs = request.get("inputs")
    for tensor in inputs if isinstance(inputs, list) else []:  # else: validation says why
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            payloads.append(None)
            continue
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0
                or offset + size > len(blob)):
            raise BadRequestError(f"input {tensor.get('name')!r}: binary_data_size {size} "
                                  f"exceeds the {len(blob) - offset} bytes left")
        payloads.append(blob[offset:offset + size])
        offset += size
    if offset != len(blob):
        raise BadRequestError(f"{len(blob) - offset} trailing bytes match no input")
    return payloads


def decode_binary(datatype: str, shape: list[int], payload: bytes) -> list[object]:
    """Binary payload -> nested list (numeric) or list of bytes (BYTES)."""
    if datatype == "BYTES":
        return [*_unpack_bytes(payload)]
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise BadRequestError(f"unsupported datatype {datatype}")
    if not shape or any(d < 0 for d in shape):
        raise BadRequestError(f"binary input shape {shape} is invalid: give every dimension "
                              "as a size ≥ 0")
    itemsize = np.dtype(dtype).itemsize
    if len(payload) % itemsize:
        raise BadRequestError(f"binary {datatype} data is {len(payload)} bytes, not a multiple "
                              f"of the {itemsize}-byte element size")
    arr = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"))
    needed = math.prod(shape)
    if arr.size != needed:
        raise BadRequestError(f"binary data holds {arr.size} values, shape {shape} needs "
                              f"{needed}")
    values: list[object] = arr.reshape(shape).tolist()  # nested lists of numbers
    return values


def _unpack_bytes(payload: bytes) -> list[bytes]:
    items: list[bytes] = []
    offset = 0
    while offset < len(payload):
        if offset + 4 > len(payload):
            raise BadRequestError("BYTES binary data is truncated")
        (n,) = struct.unpack_from("<I", payload, offset)
        if offset + 4 + n > len(payload):
            raise BadRequestError(f"BYTES binary data is truncated: element {len(items)} "
                                  f"declares {n} bytes, only {len(payload) - offset - 4} remain")
        items.append(payload[offset + 4:offset + 4 + n])
        offset += 4 + n
    return items


def encode_binary_outputs(response: dict[str, Any], binary: set[str]) -> tuple[bytes, int]:
    """Move the data of outputs named in `binary` behind the JSON; (body, json length)."""
    blobs = []
    for out in response["outputs"]:
        if out["name"] not in binary:
            continue
        raw = _pack(out["datatype"], out.pop("data"))
        out.setdefault("parameters", {})["binary_data_size"] = len(raw)
        blobs.append(raw)
    head = json.dumps(response, separators=(",", ":")).encode()
    return head + b"".join(blobs), len(head)


def _pack(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = [s.encode() if isinstance(s, str) else bytes(s) for s in data]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.asarray(data, dtype=np.dtype(NUMPY_TYPES[datatype]).newbyteorder("<")).tobytes()
