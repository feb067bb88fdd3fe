"""Input preprocessing per input kind: validate raw inputs, encode items, collate a batch.

``encode`` runs on the request path (one request's inputs; errors are that request's
alone); ``collate`` runs on the device worker over items of many requests.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bases.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 4096 * 4096


class TensorPreprocessor:
    """Numeric vectors/tensors of a fixed shape, as nested lists of numbers."""

    input_kind = "tensor"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def encode(self, raw: Sequence[Any]) -> list[torch.Tensor]:
        return [self._one(i, r) for i, r in enumerate(raw)]

    def _one(self, index: int, value: Any) -> torch.Tensor:
        try:
            t = torch.as_tensor(np.asarray(value, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise InputError(f"input {index}: not a numeric array ({exc})") from exc
        if tuple(t.shape) != self.shape:
            raise InputError(
                f"input {index}: shape {list(t.shape)}, expected {list(self.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"input {index}: contains NaN or infinite values")
        return t

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))  # [B, *shape]

    def example(self) -> torch.Tensor:
        return torch.zeros((2, *self.shape))


def images_to_tensor(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8-range pixels [B, H, W] or [B, H, W, 3] -> normalized float [B, 3, size, size]."""
    x = pixels.to(torch.float32) / 255.0
    x = x.unsqueeze(-1).expand(*x.shape, 3) if x.dim() == 3 else x  # [B, H, W, 3]
    x = x.permute(0, 3, 1, 2)  # [B, 3, H, W]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ImagePreprocessor:
    """Images as encoded bytes (PNG/JPEG/...) or nested arrays of 0-255 values (HxW or HxWx3)."""

    input_kind = "image"

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self, raw: Sequence[Any]) -> list[torch.Tensor]:
        return [self._one(i, r) for i, r in enumerate(raw)]

    def _one(self, index: int, value: Any) -> torch.Tensor:
        pixels = _decode_image(index, value) if isinstance(value, bytes) else _array_image(
            index, value)
        return images_to_tensor(pixels.unsqueeze(0), self.size)[0]  # [3, S, S]

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))  # [B, 3, S, S]

    def example(self) -> torch.Tensor:
        return images_to_tensor(torch.zeros(2, self.size, self.size), self.size)


def _decode_image(index: int, data: bytes) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(f"input {index}: image is {img.width}x{img.height}, "
                                 f"over the {MAX_IMAGE_PIXELS}-pixel limit")
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"input {index}: image could not be decoded "
                         f"(send base64 PNG or JPEG): {exc}") from exc
    return torch.from_numpy(rgb.copy())  # [H, W, 3]


def _array_image(index: int, value: Any) -> torch.Tensor:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"input {index}: image must be base64 bytes or a nested array of "
                         f"0-255 values ({exc})") from exc
    ok_shape = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)
    if not ok_shape or min(arr.shape[:2], default=0) < 1:
        raise InputError(f"input {index}: image array has shape {list(arr.shape)}, "
                         "expected [H, W] (grey) or [H, W, 3] (RGB)")
    if arr.shape[0] * arr.shape[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"input {index}: image is over the {MAX_IMAGE_PIXELS}-pixel limit")
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 255:
        raise InputError(f"input {index}: pixel values must be finite and within 0-255")
    return torch.from_numpy(arr)


class TextPreprocessor:
    """Text strings, WordPiece-tokenized and truncated to max_tokens."""

    input_kind = "text"

    def __init__(self, tokenizer_file: Path, max_tokens: int, max_chars: int) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_tokens)
        self.max_chars = max_chars

    def encode(self, raw: Sequence[Any]) -> list[torch.Tensor]:
        for i, text in enumerate(raw):
            if not isinstance(text, str):
                raise InputError(f"input {i}: expected a text string, got {type(text).__name__}")
            if len(text) > self.max_chars:
                raise InputError(f"input {i}: text has {len(text)} characters, over the "
                                 f"limit of {self.max_chars}")
        encodings = self.tokenizer.encode_batch(list(raw))
        return [torch.tensor(e.ids, dtype=torch.long) for e in encodings]

    def collate(self, items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest item: (ids [B, T], mask [B, T])."""
        width = max(len(t) for t in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, t in enumerate(items):
            ids[row, : len(t)] = t
            mask[row, : len(t)] = 1
        return ids, mask

    def example(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate(self.encode(["an example sentence", "another one"]))

