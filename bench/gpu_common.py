"""Fixtures of the GPU check: the two real bases, their real test data, components.

Bases come from the presets (``init_base``) or, on a machine without the model packages,
from a payload made by ``bench.gpu_payload`` (θ0 stored as float16, widened to float32).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from app.composition import make_plan
from app.executor import Executor
from app.plan import Plan
from bases import Base, init_base, make_spec
from bases.inputs import images_to_tensor
from bases.store import FINGERPRINT_FILE, SPEC_FILE, WEIGHTS_FILE
from registry import ResolvedItem
from tangent import CompileMode, LinearizedNet, fingerprint

# preset -> base options: the serving defaults (effnet R2 at 64×64; minilm last layer, 128 tok)
PRESETS: dict[str, dict[str, Any]] = {
    "effnet-lite0": {"image_size": 64, "tangent_blocks": 0},
    "minilm": {"tangent_layers": 1, "max_tokens": 128},
}
DATASET = {"effnet-lite0": "Fashion-MNIST test", "minilm": "BBC News test split (seed 0)"}
F16_WEIGHTS = "theta0_f16.safetensors"


# -- bases -------------------------------------------------------------------------------------
def use_payload_shim(payload: Path) -> None:
    """Make the payload's stand-in model package importable (minilm reads its config)."""
    shim = str(payload / "shim")
    if shim not in sys.path:
        sys.path.insert(0, shim)


def materialize_base(src: Path, dst: Path) -> None:
    """A payload base (θ0 in float16) -> a normal base directory with θ0 in float32."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float() if v.is_floating_point() else v
               for k, v in load_file(str(src / F16_WEIGHTS)).items()}
    save_file(tensors, str(dst / WEIGHTS_FILE))
    for path in src.iterdir():
        if path.name != F16_WEIGHTS:
            shutil.copyfile(path, dst / path.name)
    fp = fingerprint((dst / SPEC_FILE).read_bytes(), tensors)
    (dst / FINGERPRINT_FILE).write_text(fp + "\n")


def prepare_base(preset: str, workdir: Path, payload: Path | None) -> Path:
    """A base directory for the preset under workdir; returns its path."""
    out = workdir / preset
    if payload is not None:
        use_payload_shim(payload)
        materialize_base(payload / "bases" / preset, out)
    else:
        init_base(out, make_spec(preset, options=PRESETS[preset]))
    return out


# -- data --------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """Real test rows, already encoded by the base's preprocessor."""

    items: list[Any]  # one encoded input per row
    labels: torch.Tensor  # int64 [N]
    source: str

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, base: Base, size: int, limit: int | None = None) -> Iterator[Any]:
        n = len(self.items) if limit is None else min(limit, len(self.items))
        for start in range(0, n, size):
            yield base.preprocessor.collate(self.items[start:min(start + size, n)])

    def batch(self, base: Base, size: int, offset: int = 0) -> Any:
        """``size`` rows starting at offset (wrapping around): a fixed-size timing input."""
        rows = [(offset + i) % len(self.items) for i in range(size)]
        return base.preprocessor.collate([self.items[r] for r in rows])


def load_eval_data(base: Base, payload: Path | None, limit: int) -> EvalData:
    """Up to ``limit`` test rows in a seeded random order (the BBC split lists its rows class
    by class: a prefix would hold only some classes)."""
    if base.spec.input_kind == "image":
        images, labels = _fashion_mnist_test(payload)
        rows = _random_rows(len(labels), limit)
        x = images_to_tensor(torch.from_numpy(images[rows]),
                             int(PRESETS["effnet-lite0"]["image_size"]))  # [N, 3, S, S]
        return EvalData(list(x), torch.from_numpy(labels[rows]), DATASET[base.spec.preset])
    texts, text_labels = _bbc_test(payload)
    rows = _random_rows(len(texts), limit)
    items = base.preprocessor.decode_inputs([texts[i] for i in rows])
    return EvalData(items, torch.tensor([text_labels[i] for i in rows]),
                    DATASET[base.spec.preset])


def _random_rows(n: int, limit: int) -> np.ndarray:
    return np.random.default_rng(0).permutation(n)[:limit]


def _fashion_mnist_test(payload: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if payload is not None:
        with np.load(payload / "data" / "fmnist_test.npz") as npz:
            return npz["images"], npz["labels"]
    from training.data import load_fashion_mnist

    test = load_fashion_mnist()[1]
    return np.asarray(test.inputs), test.labels


def _bbc_test(payload: Path | None) -> tuple[list[str], list[int]]:
    if payload is not None:
        doc = json.loads((payload / "data" / "bbc_test.json").read_text())
        return list(doc["texts"]), list(doc["labels"])
    from training.data import load_bbc, split_train_val_test

    test = split_train_val_test(load_bbc(), seed=0).test
    return list(test.inputs), test.labels.tolist()


# -- components --------------------------------------------------------------------------------
def random_components(net: LinearizedNet, count: int, seed: int, rel_scale: float = 0.02
                      ) -> list[dict[str, torch.Tensor]]:
    """Random tangents over the whole region, each tensor ~ rel_scale · std(θ0 tensor)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        delta = {}
        for name in net.names:
            p = net.params[name].detach().float().cpu()
            std = float(p.std()) if p.numel() > 1 else float(p.abs().mean())
            delta[name] = torch.randn(p.shape, generator=gen) * rel_scale * max(std, 1e-3)
        out.append(delta)
    return out


def probe_components(base: Base, data: EvalData, rows: slice, count: int, seed: int,
                     kappa: float = 5.0, ridge: float = 1.0) -> list[dict[str, torch.Tensor]]:
    """``count`` components that predict something: each is a ridge-regression fit of the
    classifier's tangent (targets κ·one-hot − f0) on one random shard of ``rows``, plus a
    small random tangent on the rest of the region (so the JVP through earlier tangent
    layers is exercised). Closed form, float64 on the CPU: no training loop needed."""
    feats, logits0 = _classifier_inputs(base, data, rows)  # [n, D], [n, C]
    labels = data.labels[rows]
    target = torch.nn.functional.one_hot(labels, logits0.shape[1]).double() * kappa - logits0
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    noise = random_components(base.net, count, seed + 1, rel_scale=0.01)
    out = []
    for k, shard in enumerate(order.chunk(count)):
        z = torch.cat([feats[shard], torch.ones(len(shard), 1, dtype=torch.float64)], 1)
        a = z.T @ z + ridge * torch.eye(z.shape[1], dtype=torch.float64)  # [D+1, D+1]
        sol = torch.linalg.solve(a, z.T @ target[shard])  # [D+1, C]
        delta = dict(noise[k])
        delta["classifier.weight"] = sol[:-1].T.float().contiguous()  # [C, D]
        delta["classifier.bias"] = sol[-1].float().contiguous()  # [C]
        out.append(delta)
    return out


def _classifier_inputs(base: Base, data: EvalData, rows: slice
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's inputs and θ0's logits for the rows, float64 on the CPU."""
    net = base.net.net
    body, head = net[:-1], net[-1]
    feats, logits = [], []
    with torch.no_grad():
        items = data.items[rows]
        for start in range(0, len(items), 64):
            x = base.preprocessor.collate(items[start:start + 64])
            z = body(x)  # [B, D]
            feats.append(z.double())
            logits.append(head(z).double())
    return torch.cat(feats), torch.cat(logits)


# -- executors and plans -----------------------------------------------------------------------
def digest_of(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


class Components:
    """Component tangents by digest, as the registry would hand them to the executor."""

    def __init__(self) -> None:
        self.by_digest: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, delta: dict[str, torch.Tensor]) -> str:
        digest = digest_of(name)
        self.by_digest[digest] = delta
        return digest

    def load(self, digest: str) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.by_digest[digest].items()}


def plan_of(weights: dict[str, float], normalize: str = "none") -> Plan:
    """A plan over digests (the id is the digest's first 12 hex digits)."""
    items = [ResolvedItem(d[:12], d, w) for d, w in sorted(weights.items())]
    return make_plan(items, 1, normalize, False)  # type: ignore[arg-type]


def executor_for(base: Base, comps: Components, device: torch.device, dtype: torch.dtype,
                 cache_bytes: int = 8 << 30, compile_mode: CompileMode = "none"
                 ) -> Executor:
    """An Executor over its own copy of θ0 (Executor moves the network it is given)."""
    return Executor(copy.deepcopy(base.net), comps.load, device, dtype, cache_bytes,
                    compile_mode)


def float64_reference(base: Base) -> LinearizedNet:
    return copy.deepcopy(base.net).to(torch.device("cpu"), torch.float64)

