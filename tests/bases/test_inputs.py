"""Input preprocessing: tensors, images (encoded bytes or nested arrays), text."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from bases import InputError
from bases.inputs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessor,
    TensorPreprocessor,
    TextPreprocessor,
)
from bases.presets import minilm
from tests.tangent.numerics import assert_close

# -- tensors --------------------------------------------------------------------------------


def test_tensor_inputs(gen: torch.Generator) -> None:
    pre = TensorPreprocessor((4,))
    raw = torch.randn(3, 4, generator=gen).tolist()
    items = pre.decode_inputs(raw)
    batch = pre.collate(items)
    assert batch.shape == (3, 4) and batch.dtype == torch.float32
    assert torch.equal(batch, torch.tensor(raw))
    assert pre.example().shape == (2, 4)


@pytest.mark.parametrize(("value", "fragment"), [
    ([1.0, 2.0, 3.0], "input 1: shape [3], expected [4]"),
    ([[1.0, 2.0, 3.0, 4.0]], "input 1: shape [1, 4], expected [4]"),
    (["a", "b", "c", "d"], "input 1: not a numeric array"),
    ([1.0, [2.0], 3.0, 4.0], "input 1: not a numeric array"),
    ([1.0, float("nan"), 3.0, 4.0], "input 1: contains NaN or infinite"),
    ([1.0, float("inf"), 3.0, 4.0], "input 1: contains NaN or infinite"),
])
def test_bad_tensor_inputs(value: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        TensorPreprocessor((4,)).decode_inputs([[0.0, 1.0, 2.0, 3.0], value])
    assert fragment in str(info.value)


# -- images ---------------------------------------------------------------------------------

def _pixels(gen: torch.Generator, h: int, w: int, channels: int | None = 3) -> np.ndarray:
    shape = (h, w) if channels is None else (h, w, channels)
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).numpy()


def _encode(pixels: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_png_bytes_equal_the_array_path(gen: torch.Generator) -> None:
    pre = ImagePreprocessor(32)
    rgb, grey = _pixels(gen, 37, 23), _pixels(gen, 28, 28, None)
    from_png = pre.decode_inputs([_encode(rgb, "PNG"), _encode(grey, "PNG")])
    from_arrays = pre.decode_inputs([rgb.tolist(), grey.tolist()])
    for a, b in zip(from_png, from_arrays, strict=True):
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
    rgba = np.concatenate([rgb, _pixels(gen, 37, 23, 1)], axis=-1)
    assert torch.equal(pre.decode_inputs([_encode(rgba, "PNG")])[0], from_png[0])  # alpha dropped
    assert pre.collate(from_png).shape == (2, 3, 32, 32)


def test_jpeg_bytes(gen: torch.Generator) -> None:
    pre = ImagePreprocessor(32)
    smooth = np.kron(_pixels(gen, 8, 8), np.ones((8, 8, 1), dtype=np.uint8))  # JPEG-friendly
    (from_jpeg,) = pre.decode_inputs([_encode(smooth, "JPEG", quality=95, subsampling=0)])
    (exact,) = pre.decode_inputs([smooth.tolist()])
    assert from_jpeg.shape == (3, 32, 32)
    assert float((from_jpeg - exact).abs().mean()) < 0.1  # normalized units (1/255/0.22=0.018)


def test_grey_and_rgb_arrays(gen: torch.Generator) -> None:
    pre = ImagePreprocessor(16)
    grey = _pixels(gen, 16, 16, None)
    (g,) = pre.decode_inputs([grey.tolist()])
    (c,) = pre.decode_inputs([np.stack([grey] * 3, -1).tolist()])
    assert torch.equal(g, c)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (torch.from_numpy(grey).float() / 255).expand(3, 16, 16)  # no resize at 16x16
    assert_close(g, (expected - mean) / std, rtol=1e-6, atol=1e-6)
    (white,) = pre.decode_inputs([[[255.0] * 5] * 7])  # resized 7x5 -> 16x16
    assert_close(white, ((1 - mean) / std).expand(3, 16, 16), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("value", "fragment"), [
    ([[[1, 2, 3, 4]]], "expected [H, W] (grey) or [H, W, 3] (RGB)"),
    ([1, 2, 3], "expected [H, W]"),
    ([], "expected [H, W]"),
    ([[]], "expected [H, W]"),
    ([[0, 256]], "within 0-255"),
    ([[0, -1]], "within 0-255"),
    ([[0, float("nan")]], "within 0-255"),
    ([[0, 1], [2]], "nested array"),
    ("a string", "nested array"),
])
def test_bad_image_arrays(value: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        ImagePreprocessor(16).decode_inputs([[[0, 0], [0, 0]], value])
    assert "input 1:" in str(info.value) and fragment in str(info.value), str(info.value)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_undecodable_images(gen: torch.Generator) -> None:
    pre = ImagePreprocessor(16)
    junk = bytes(torch.randint(0, 256, (300,), generator=gen, dtype=torch.uint8).tolist())
    png = _encode(_pixels(gen, 20, 20), "PNG")
    for bad in (junk, b"", png[: len(png) // 2], b"GIF89a" + junk):
        with pytest.raises(InputError, match="could not be decoded"):
            pre.decode_inputs([bad])


def test_oversized_images(gen: torch.Generator) -> None:
    pre = ImagePreprocessor(16)
    with pytest.raises(InputError, match="5000x5000, over the 16777216-pixel limit"):
        pre.decode_inputs([_png_header_only(5000, 5000)])
    with pytest.raises(InputError, match="could not be decoded"):  # PIL's decompression bomb
        pre.decode_inputs([_png_header_only(20000, 20000)])
    with pytest.raises(InputError, match="pixel limit"):
        pre.decode_inputs([np.zeros((4097, 4097), dtype=np.uint8)])


# -- text -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_pre() -> TextPreprocessor:
    return TextPreprocessor(minilm.model_dir() / "tokenizer.json", max_tokens=16, max_chars=200)


def test_text_tokenize_truncate_collate(text_pre: TextPreprocessor, seed: int) -> None:
    words = ["the", "bank", "raised", "rates", "while", "team", "won", "final", "again"]
    rnd = random.Random(seed)
    short = " ".join(rnd.choice(words) for _ in range(3))
    long = " ".join(rnd.choice(words) for _ in range(20))  # > 16 tokens
    a, b = text_pre.decode_inputs([short, long])
    assert a[0] == 101 and a[-1] == 102 and len(a) == 5, (short, a)  # [CLS] w w w [SEP]
    assert len(b) == 16 and b[-1] == 102  # truncated to max_tokens, still ends with [SEP]
    ids, mask = text_pre.collate([a, b])
    assert ids.shape == mask.shape == (2, 16)
    assert mask[0].tolist() == [1] * 5 + [0] * 11 and bool(mask[1].all())
    assert torch.equal(ids[0, :5], a) and not ids[0, 5:].any()
    assert text_pre.decode_inputs([""])[0].tolist() == [101, 102]


def test_text_errors(text_pre: TextPreprocessor) -> None:
    with pytest.raises(InputError, match="input 1: text has 201 characters, over the limit of 200"):
        text_pre.decode_inputs(["ok", "x" * 201])
    text_pre.decode_inputs(["x" * 200])
    with pytest.raises(InputError, match="input 0: expected a text string, got int"):
        text_pre.decode_inputs([3])
    with pytest.raises(InputError, match="got bytes"):
        text_pre.decode_inputs([b"bytes"])
