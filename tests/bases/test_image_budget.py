"""Big images: decoded near the model's input size, and a per-request pixel budget (issue 14)."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import bases.inputs as inputs
from bases import InputError
from bases.inputs import ImagePreprocessor
from tests.bases.test_inputs import _png_header_only

SIDE = 4096


def _blocky(seed: int, side: int = SIDE, cells: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(small, big): a cells x cells RGB image and the same blown up to side x side by pixel
    repetition; a few hundred KB as PNG however big."""
    small = np.random.default_rng(seed).integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    big = np.kron(small, np.ones((side // cells, side // cells, 1), dtype=np.uint8))
    return small, big


def _save(pixels: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def converted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Shapes of the pixel arrays handed to images_to_tensor (converted to float32 there)."""
    shapes: list[tuple[int, ...]] = []
    real = inputs.images_to_tensor

    def spy(pixels: torch.Tensor, size: int) -> torch.Tensor:
        shapes.append(tuple(pixels.shape))
        return real(pixels, size)

    monkeypatch.setattr(inputs, "images_to_tensor", spy)
    return shapes


def test_big_png_is_decoded_near_the_input_size(seed: int,
                                                converted: list[tuple[int, ...]]) -> None:
    size = 32
    small, big = _blocky(seed)
    png = _save(big, "PNG")
    assert len(png) < 2_000_000
    pre = ImagePreprocessor(size)
    del big
    tracemalloc.start()
    try:
        (got,) = pre.decode_inputs([png])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What becomes float is at most 4x the input side (here 2x), never 4096 x 4096.
    assert converted == [(1, 2 * size, 2 * size, 3)], converted
    # numpy arrays are traced: the full-size uint8 array alone would be 48 MiB.
    assert peak < 4 * 1024 * 1024, peak
    # Pixel-repeated blocks reduce exactly: the same as the small image given directly.
    (want,) = pre.decode_inputs([small.tolist()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_big_jpeg_is_decoded_near_the_input_size(seed: int,
                                                 converted: list[tuple[int, ...]]) -> None:
    size = 32
    small, big = _blocky(seed)
    jpeg = _save(big, "JPEG", quality=95, subsampling=0)
    pre = ImagePreprocessor(size)
    del big
    (got,) = pre.decode_inputs([jpeg])
    (shape,) = converted[:1]
    assert shape[0] == 1 and 2 * size <= shape[1] <= 4 * size and 2 * size <= shape[2] <= 4 * size
    (want,) = pre.decode_inputs([small.tolist()])
    assert float((got - want).abs().mean()) < 0.1  # JPEG loss, normalized units


def test_small_and_medium_images_decode_exactly_as_before(seed: int) -> None:
    """Up to 4x the input side nothing is reduced: the array path gives the same tensor."""
    pre = ImagePreprocessor(16)
    rng = np.random.default_rng(seed)
    for h, w in ((16, 16), (63, 40), (40, 63)):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (from_png,) = pre.decode_inputs([_save(pixels, "PNG")])
        (from_array,) = pre.decode_inputs([pixels.tolist()])
        assert torch.equal(from_png, from_array)


def test_request_pixel_budget_is_checked_from_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    pre = ImagePreprocessor(16)
    decoded: list[int] = []
    monkeypatch.setattr(inputs, "_decode_image", lambda i, *a: decoded.append(i))
    images = [_png_header_only(4000, 4000)] * 5  # 80 M pixels declared, nothing decodable
    with pytest.raises(InputError) as info:
        pre.check_pixel_budget(images, 64 * 1024 * 1024, "TMC_MAX_REQUEST_PIXELS")
    assert str(info.value) == (
        "the 5 images of this request declare 80000000 pixels in all, over the per-request "
        "limit of 67108864 pixels (TMC_MAX_REQUEST_PIXELS); send fewer or smaller images "
        "(this model sees 16x16)")
    assert decoded == []
    assert pre.check_pixel_budget(images[:4], 64 * 1024 * 1024) == 64_000_000
    arrays = [[[0] * 8] * 8] * 3  # nested arrays are bounded by the body size, not counted
    assert pre.check_pixel_budget([*arrays, images[0]], 16_000_000) == 16_000_000
    # One image over the per-image limit is named as before, still without decoding.
    with pytest.raises(InputError, match="input 1: image is 5000x5000, over the 16777216-pixel"):
        pre.check_pixel_budget([images[0], _png_header_only(5000, 5000)], 10**9)
    with pytest.raises(InputError, match="input 0: image could not be decoded"):
        pre.check_pixel_budget([b"not an image"], 10**9)
    assert decoded == []
