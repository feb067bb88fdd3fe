"""Image requests on the service: the per-request pixel budget, and the bounded decode pool
that keeps a few huge image requests from starving everyone else (issue 14)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import app.decode_pool as decode_pool
import bases.inputs as inputs
from bases import init_base, make_spec
from tests.app.conftest import live_server, settings_for


@pytest.fixture(scope="module")
def image_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imgpool") / "base"
    init_base(out, make_spec("effnet-lite0", options={"image_size": 32}))
    return out


def png_b64(side: int, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = inputs._decode_image

    def spy(index: int, *args: object) -> object:
        calls.append(index)
        return real(index, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(inputs, "_decode_image", spy)
    return calls


def test_request_over_the_pixel_budget_is_refused_before_decoding(
        image_base_dir: Path, tmp_path: Path, decode_calls: list[int]) -> None:
    settings = settings_for(image_base_dir, tmp_path / "registry", max_request_pixels=100_000)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/predict", json={"inputs": [png_b64(200, 1), png_b64(200, 2),
                                                   png_b64(200, 3)]})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == (
            "the 3 images of this request declare 120000 pixels in all, over the per-request "
            "limit of 100000 pixels (TMC_MAX_REQUEST_PIXELS); send fewer or smaller images "
            "(this model sees 32x32)")
        assert decode_calls == []
        r = c.post("/v1/predict", json={"inputs": [png_b64(200, 1), png_b64(200, 2)]})
        assert r.status_code == 200, r.text
        assert decode_calls == [0, 1]


@pytest.fixture
def blocked_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event,
                                                                        threading.Event]]:
    """Every image decode announces itself on ``entered`` and waits for ``release``."""
    entered, release = threading.Event(), threading.Event()
    real = inputs._decode_image

    def blocked(index: int, *args: object) -> object:
        entered.set()
        release.wait(60)
        return real(index, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(inputs, "_decode_image", blocked)
    monkeypatch.setattr(decode_pool, "decode_workers", lambda: 1)
    yield entered, release
    release.set()


def test_saturated_decode_pool_refuses_images_but_not_other_requests(
        image_base_dir: Path, tmp_path: Path,
        blocked_decoding: tuple[threading.Event, threading.Event]) -> None:
    entered, release = blocked_decoding
    settings = settings_for(image_base_dir, tmp_path / "registry", decode_queue_size=0)
    with live_server(settings) as url, httpx.Client(base_url=url, timeout=30) as c:
        first: dict[str, httpx.Response] = {}

        def send_first() -> None:
            with httpx.Client(base_url=url, timeout=90) as c1:
                first["r"] = c1.post("/v1/predict", json={"inputs": [png_b64(64)]})

        sender = threading.Thread(target=send_first, daemon=True)
        sender.start()
        assert entered.wait(60), "the first image request never started decoding"
        # The one decode thread is busy and no request may wait: the next image request is
        # refused at once, while health checks and requests with nothing to decode answer.
        r = c.post("/v1/predict", json={"inputs": [png_b64(64, 1)]})
        assert r.status_code == 503, r.text
        assert "image decoding is saturated" in r.json()["error"]
        assert "TMC_DECODE_QUEUE_SIZE" in r.json()["error"] and r.headers["retry-after"] == "1"
        assert c.get("/healthz").status_code == 200
        pixels = np.zeros((32, 32), dtype=np.uint8).tolist()
        r = c.post("/v1/predict", json={"inputs": [pixels]})  # a nested array: no decoding
        assert r.status_code == 200, r.text
        assert 'tmc_rejected_requests_total{reason="overloaded"} 1.0' in c.get("/metrics").text
        release.set()
        sender.join(90)
        assert first["r"].status_code == 200, first["r"].text
        r = c.post("/v1/predict", json={"inputs": [png_b64(64, 2)]})  # the pool is free again
        assert r.status_code == 200, r.text
