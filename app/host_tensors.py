"""A component version's tensors on the host, decoded from its verified safetensors bytes.

``decode_tensors`` copies each tensor's bytes out of the verified file with the GIL released:
``safetensors.torch.load`` copies holding it, ~0.1 s per 100 MB measured here, and every
Python step of the device thread and of the event loop waited for it (app/fetch.py decodes
on its fetch threads). Byte orders or dtypes it does not copy itself go to the library.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from typing import TypedDict

import numpy as np
import torch
from safetensors.torch import load as st_load

HostTensors = dict[str, torch.Tensor]  # parameter name -> CPU tensor of one version
LoadTensors = Callable[[str], HostTensors]
# safetensors dtype names decode_tensors copies itself (others: safetensors.torch.load)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _Entry(TypedDict):
    """One tensor's entry in a safetensors header (JSON)."""

    dtype: str
    shape: list[int]
    data_offsets: list[int]


def verified_tensors(load_bytes: Callable[[str], bytes]) -> LoadTensors:
    """A version's tensors from its verified bytes (``Registry.load_bytes``: index check,
    blob read, sha256), decoded by ``decode_tensors``."""
    return lambda digest: decode_tensors(load_bytes(digest))


def decode_tensors(data: bytes) -> HostTensors:
    """safetensors bytes -> CPU tensors of their own (writable, in the file's dtypes). Each
    tensor's bytes are copied by numpy, which releases the GIL while it copies."""
    (size,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + size])
    header.pop("__metadata__", None)
    if sys.byteorder != "little" or any(h["dtype"] not in DTYPES for h in header.values()):
        return dict(st_load(data))  # the file is little-endian; odd dtypes: the library
    return {name: _copy_out(data, 8 + size, h) for name, h in header.items()}


def _copy_out(data: bytes, start: int, entry: _Entry) -> torch.Tensor:
    """One header entry's tensor, copied out of ``data`` (its data section at ``start``)."""
    begin, end = (int(v) for v in entry["data_offsets"])
    shape = [int(n) for n in entry["shape"]]
    out = torch.empty(shape, dtype=DTYPES[entry["dtype"]])  # [*shape], the file's dtype
    raw = out.reshape(-1).view(torch.uint8).numpy()  # out's bytes, flat
    if raw.size != end - begin:
        raise ValueError(f"safetensors entry {entry}: {end - begin} bytes for a tensor of "
                         f"{raw.size}")
    raw[:] = np.frombuffer(data, np.uint8, end - begin, start + begin)
    return out

