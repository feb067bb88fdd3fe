"""Content fingerprint of a base: sha256 over its spec and every θ0 tensor."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def fingerprint(spec_json: bytes, tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest that changes if the spec or any single tensor value, dtype or shape changes."""
    h = hashlib.sha256()
    h.update(b"tmc.base/1\0")
    h.update(spec_json)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
