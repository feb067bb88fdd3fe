"""Input preprocessing per input kind (bases.contracts.Preprocessor): validate raw inputs and
decode them to tensors, collate a batch.

``decode_inputs`` runs on the request path (one request's inputs; errors are that request's
alone); ``collate`` runs on the device worker over items of many requests. Raw inputs are
``object``: whatever the HTTP layer parsed (JSON values, image bytes); each preprocessor checks
what it was given and says what it wanted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from bases.errors import InputError

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 4096 * 4096
FLOAT32_MAX = float(np.finfo(np.float32).max)


def as_float32(value: object) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A request's nested numbers as float32. A finite JSON number beyond float32's range
    (1e39, 1.8e308) becomes ±inf, which the caller refuses as non-finite (422). numpy would
    also warn for that cast ("overflow encountered in cast"): noise on stderr, and where
    warnings are errors (pytest's ``filterwarnings = error``, ``PYTHONWARNINGS=error``) a
    RuntimeWarning raised on the request thread, which no error table maps (a 500). The
    overflow is the client's input and is checked right after, so the cast does not warn."""
    with np.errstate(over="ignore"):
        return np.asarray(value, dtype=np.float32)


class TensorPreprocessor:
    """Numeric vectors/tensors of a fixed shape, as nested lists of numbers."""

    input_kind = "tensor"

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def decode_inputs(self, raw: Sequence[object]) -> list[torch.Tensor]:
        return [self._one(i, r) for i, r in enumerate(raw)]

    def _one(self, index: int, value: object) -> torch.Tensor:
        try:
            t = torch.as_tensor(as_float32(value))
        except (TypeError, ValueError) as exc:
            raise InputError(f"input {index}: not a numeric array ({exc})") from exc
        if tuple(t.shape) != self.shape:
            raise InputError(
                f"input {index}: shape {list(t.shape)}, expected {list(self.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"input {index}: contains NaN or infinite values, or values "
                             f"beyond float32's range (|x| > {FLOAT32_MAX:.4g})")
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

    def decode_inputs(self, raw: Sequence[object]) -> list[torch.Tensor]:
        return [self._one(i, r) for i, r in enumerate(raw)]

    def _one(self, index: int, value: object) -> torch.Tensor:
        pixels = (_decode_image(index, value, self.size) if isinstance(value, bytes)
                  else _array_image(index, value))
        return images_to_tensor(pixels.unsqueeze(0), self.size)[0]  # [3, S, S]

    def check_pixel_budget(self, raw: Sequence[object], limit: int,
                           setting: str = "the per-request pixel limit") -> int:
        """Refuse, before decoding anything, a request whose encoded images declare (in their
        headers, read without decoding the pixels) more than ``limit`` pixels in all, or any
        one image over MAX_IMAGE_PIXELS. Nested arrays are not counted: the body size bounds
        them. Returns the declared total."""
        total, count = 0, 0
        for index, value in enumerate(raw):
            if isinstance(value, bytes):
                width, height = image_header_size(index, value)
                _check_image_size(index, width, height)
                total, count = total + width * height, count + 1
        if total > limit:
            raise InputError(
                f"the {count} images of this request declare {total} pixels in all, over the "
                f"per-request limit of {limit} pixels ({setting}); send fewer or smaller "
                f"images (this model sees {self.size}x{self.size})")
        return total

    def collate(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(items))  # [B, 3, S, S]

    def example(self) -> torch.Tensor:
        return images_to_tensor(torch.zeros(2, self.size, self.size), self.size)


def image_header_size(index: int, data: bytes) -> tuple[int, int]:
    """(width, height) as an encoded image's header declares them; no pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"input {index}: image could not be decoded "
                         f"(send base64 PNG or JPEG): {exc}") from exc


def _check_image_size(index: int, width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"input {index}: image is {width}x{height}, "
                         f"over the {MAX_IMAGE_PIXELS}-pixel limit")


def _decode_image(index: int, data: bytes, size: int | None = None) -> torch.Tensor:
    """Decoded RGB pixels [H, W, 3] uint8. With ``size`` (the model's input side), a side of
    4x ``size`` or more is shrunk while decoding (JPEG: DCT scaling by ``draft``; others:
    box-filter ``reduce`` by an integer factor) to between 2x and 4x ``size``, so neither a
    full-size float copy nor its bilinear resize is ever made; an image whose sides are both
    under 4x ``size`` decodes exactly as before."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_image_size(index, img.width, img.height)
            rgb = _decode_reduced(img, size)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise InputError(f"input {index}: image could not be decoded "
                         f"(send base64 PNG or JPEG): {exc}") from exc
    return torch.from_numpy(pixels.copy())  # [H, W, 3]


def _decode_reduced(img: Image.Image, size: int | None) -> Image.Image:
    """``img`` as an RGB PIL image, shrunk by integer factors toward 2x ``size`` per side."""
    if size is None:
        return img.convert("RGB")
    floor = 2 * size
    if img.format == "JPEG" and min(img.width // floor, img.height // floor) >= 2:
        img.draft(None, (floor, floor))  # decode at 1/2, 1/4 or 1/8 scale, still >= floor
    if img.mode not in ("RGB", "RGBA", "L"):  # reduce() wants a plain mode: convert first
        img = img.convert("RGB")
    factors = (max(1, img.width // floor), max(1, img.height // floor))
    if factors != (1, 1):
        img = img.reduce(factors)
    return img.convert("RGB")


def _array_image(index: int, value: object) -> torch.Tensor:
    try:
        arr = as_float32(value)
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

    def decode_inputs(self, raw: Sequence[object]) -> list[torch.Tensor]:
        texts: list[str] = []
        for i, text in enumerate(raw):
            if not isinstance(text, str):
                raise InputError(f"input {i}: expected a text string, got {type(text).__name__}")
            if len(text) > self.max_chars:
                raise InputError(f"input {i}: text has {len(text)} characters, over the "
                                 f"limit of {self.max_chars}")
            texts.append(text)
        encodings = self.tokenizer.encode_batch(texts)
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
        return self.collate(self.decode_inputs(["an example sentence", "another one"]))

