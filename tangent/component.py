"""The component file: a safetensors tangent over a base's tangent region.

Tensor names are base parameter names inside the tangent region (absent = zero);
dtype float32, float16 or bfloat16; metadata carries at least ``format`` and
``base_fingerprint``. ``decode_component`` is the one place that decides whether
bytes are a valid component for a base; it raises a precise ComponentError.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tangent.errors import (
    ComponentTooLargeError,
    MissingMetadataError,
    NonFiniteError,
    NotSafetensorsError,
    UnknownTensorError,
    WrongBaseError,
    WrongDtypeError,
    WrongShapeError,
)
from tangent.linearize import TangentParam

FORMAT = "tmc.component/1"
REQUIRED_METADATA = ("format", "base_fingerprint")
ALLOWED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DEFAULT_MAX_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Component:
    """A validated component: its tensors, its metadata and the sha256 of its bytes."""

    digest: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    nbytes: int = field(default=0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_component(tensors: Mapping[str, torch.Tensor], base_fingerprint: str,
                     provenance: Mapping[str, object] | None = None) -> bytes:
    """Serialize a tangent into component bytes. Provenance values become strings (JSON)."""
    metadata = {"format": FORMAT, "base_fingerprint": base_fingerprint}
    for key, value in (provenance or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    contiguous = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    data: bytes = st_save(contiguous, metadata=metadata)
    return _sorted_metadata(data)


def _sorted_metadata(data: bytes) -> bytes:
    """Rewrite the header with metadata keys sorted: safetensors writes them in hash order,
    so the same tensors and metadata would otherwise encode to different bytes (digests)."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(text)) + text + data[8 + header_len:]


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, without loading tensors."""
    if len(data) < 8:
        raise NotSafetensorsError(
            f"body is {len(data)} bytes: not a safetensors file (needs an 8-byte header length)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise NotSafetensorsError(
            f"safetensors header claims {header_len} bytes but only {len(data) - 8} follow: "
            "the file is truncated or not safetensors")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise NotSafetensorsError(f"safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise NotSafetensorsError("safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise NotSafetensorsError("safetensors __metadata__ is not a JSON object of strings")
    return {str(k): str(v) for k, v in meta.items()}


def decode_component(data: bytes, base_fingerprint: str, region: Mapping[str, TangentParam],
                     max_bytes: int = DEFAULT_MAX_BYTES) -> Component:
    """Parse and validate component bytes against a base; raise a precise ComponentError."""
    if len(data) > max_bytes:
        raise ComponentTooLargeError(
            f"component is {len(data)} bytes, over the limit of {max_bytes} bytes")
    metadata = read_metadata(data)
    _check_metadata(metadata, base_fingerprint)
    _check_complete(data)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise NotSafetensorsError(f"not a valid safetensors file: {exc}") from exc
    for name, tensor in tensors.items():
        _check_tensor(name, tensor, region)
    return Component(sha256_hex(data), dict(tensors), metadata, len(data))


def _check_complete(data: bytes) -> None:
    """Tell a truncated upload apart from garbage: the header says how long the data is."""
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    ends = [e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"
            and isinstance(e, dict) and isinstance(e.get("data_offsets"), list)
            and len(e["data_offsets"]) == 2 and isinstance(e["data_offsets"][1], int)]
    have = len(data) - 8 - header_len
    if ends and max(ends) > have:
        raise NotSafetensorsError(
            f"component is truncated: its header describes {max(ends)} bytes of tensor data "
            f"but only {have} follow; upload the whole file")


def _check_metadata(metadata: Mapping[str, str], base_fingerprint: str) -> None:
    missing = [k for k in REQUIRED_METADATA if not metadata.get(k)]
    if missing:
        raise MissingMetadataError(
            f"component metadata lacks {missing}; set format={FORMAT!r} and base_fingerprint "
            "(GET /v1/base gives it)")
    if metadata["format"] != FORMAT:
        raise MissingMetadataError(
            f"component format is {metadata['format']!r}; this server reads {FORMAT!r}")
    if metadata["base_fingerprint"] != base_fingerprint:
        raise WrongBaseError(
            f"component was made for base {metadata['base_fingerprint'][:16]}…, "
            f"this base is {base_fingerprint[:16]}…")


def _check_tensor(name: str, tensor: torch.Tensor, region: Mapping[str, TangentParam]) -> None:
    param = region.get(name)
    if param is None:
        raise UnknownTensorError(
            f"tensor {name!r} is not a parameter of the tangent region "
            f"(it has {len(region)} parameters; GET /v1/base lists them)")
    if tuple(tensor.shape) != param.shape:
        raise WrongShapeError(
            f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(param.shape)}")
    if tensor.dtype not in ALLOWED_DTYPES:
        raise WrongDtypeError(
            f"tensor {name!r} has dtype {str(tensor.dtype)[6:]}, "
            f"expected one of {sorted(ALLOWED_DTYPES.values())}")
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"tensor {name!r} has NaN or infinite values")
