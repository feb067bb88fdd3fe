"""The base fingerprint changes with any single tensor value, dtype, shape, name or the spec."""

from __future__ import annotations

import random

import torch

from tangent import fingerprint


def _tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(6, 4, generator=gen), "a.bias": torch.randn(6, generator=gen),
            "bn.num_batches_tracked": torch.tensor(7), "h.weight": torch.randn(3, 6,
                                                                                 generator=gen)}


def test_deterministic_and_order_independent(gen: torch.Generator) -> None:
    tensors = _tensors(gen)
    fp = fingerprint(b'{"name":"x"}', tensors)
    assert len(fp) == 64
    assert fingerprint(b'{"name":"x"}', dict(reversed(tensors.items()))) == fp
    assert fingerprint(b'{"name":"x"}', {k: v.clone() for k, v in tensors.items()}) == fp


def test_one_changed_value_changes_it(gen: torch.Generator, seed: int) -> None:
    tensors = _tensors(gen)
    fp = fingerprint(b"{}", tensors)
    rnd = random.Random(seed)
    for name in ("a.weight", "a.bias", "h.weight"):
        changed = {k: v.clone() for k, v in tensors.items()}
        flat = changed[name].view(-1)
        i = rnd.randrange(flat.numel())
        flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf")))  # one ulp
        assert fingerprint(b"{}", changed) != fp, f"{name}[{i}] seed={seed}"
    changed = dict(tensors, **{"bn.num_batches_tracked": torch.tensor(8)})
    assert fingerprint(b"{}", changed) != fp


def test_dtype_shape_name_and_spec_change_it(gen: torch.Generator) -> None:
    tensors = _tensors(gen)
    fp = fingerprint(b"{}", tensors)
    assert fingerprint(b"{}", dict(tensors, **{"a.bias": tensors["a.bias"].double()})) != fp
    assert fingerprint(b"{}", dict(tensors, **{"a.weight": tensors["a.weight"].reshape(4, 6)})
                       ) != fp
    renamed = {("b.bias" if k == "a.bias" else k): v for k, v in tensors.items()}
    assert fingerprint(b"{}", renamed) != fp
    assert fingerprint(b'{"x":1}', tensors) != fp
    assert fingerprint(b"{}", {k: v for k, v in tensors.items() if k != "a.bias"}) != fp
    # same bytes under another dtype of equal width must not collide either
    assert fingerprint(b"{}", {"t": torch.zeros(2, dtype=torch.int32)}) != fingerprint(
        b"{}", {"t": torch.zeros(2, dtype=torch.float32)})


def test_non_contiguous_tensors_hash_their_values(gen: torch.Generator) -> None:
    w = torch.randn(5, 3, generator=gen)
    assert fingerprint(b"{}", {"w": w.t()}) == fingerprint(b"{}", {"w": w.t().contiguous()})
