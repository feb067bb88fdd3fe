"""Body limits enforced while streaming, the admin token checked before any admin body is
read, and every response counted in tmc_requests_total (500s and disconnects included).

Through real HTTP: uvicorn serves the app wrapped in a meter that counts the request-body
bytes the app pulled from the server, so "not read" is measured on the server side (what the
client managed to push into socket buffers before the server closed is not the server's
reading)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from app.deps import require_inference
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import (
    ADMIN,
    free_port,
    metric_sample,
    settings_for,
    uvicorn_in_thread,
)

LIMIT = 64 * 1024
CHUNK = 64 * 1024
SLACK = 1024 * 1024  # what one receive may carry past the limit: uvicorn's buffer, one read


class BodyMeter:
    """Outside the whole app: the request-body bytes the app pulled, per path."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.pulled: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        self.pulled.setdefault(path, 0)

        async def counting() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self.pulled[path] += len(message.get("body", b""))
            return message

        await self.app(scope, counting, send)


@contextmanager
def metered(settings: Settings, app: FastAPI | None = None) -> Iterator[tuple[str, BodyMeter]]:
    meter = BodyMeter(app if app is not None else create_app(settings))
    port = free_port()
    with uvicorn_in_thread(uvicorn.Config(meter, host="127.0.0.1", port=port,
                                          log_level="warning", lifespan="on")):
        yield f"http://127.0.0.1:{port}", meter


class Source:
    """A chunked request body (no Content-Length) that counts the chunks the client pulled."""

    def __init__(self, total: int, chunk: int = CHUNK) -> None:
        self.chunks, self.block, self.pulled = total // chunk, b"7" * chunk, 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.block

    @property
    def exhausted(self) -> bool:
        return self.pulled >= self.chunks


@pytest.fixture
def limited(tiny_base_dir: Path, tmp_path: Path) -> Iterator[tuple[str, BodyMeter]]:
    with metered(settings_for(tiny_base_dir, tmp_path / "r", max_body_bytes=LIMIT)) as s:
        yield s


@pytest.mark.parametrize("path", ["/v1/predict", "/v2/models/tiny-mlp/infer"])
def test_a_chunked_body_over_the_limit_is_refused_while_streaming(limited, path):
    url, meter = limited
    source = Source(1024 * CHUNK)  # 64 MiB, 1024x the limit, no Content-Length
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post(path, content=iter(source), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json() == {"error": f"body is over the limit of {LIMIT} bytes "
                                     "(TMC_MAX_BODY_BYTES)"}
        assert r.headers["connection"] == "close"  # the rest of the body is never read
        assert "x-request-id" in r.headers
        # the app pulled the limit and at most one more receive, never the 64 MiB
        assert LIMIT < meter.pulled[path] <= LIMIT + SLACK, meter.pulled
        assert not source.exhausted, (source.pulled, source.chunks)
        assert metric_sample(c, "tmc_rejected_requests_total", reason="body_too_large") == 1.0
        assert metric_sample(c, "tmc_requests_total", route=path.replace("tiny-mlp", "{model}"),
                       status="413") == 1.0
        # still healthy: a small request on the same server is served
        assert c.get("/healthz").status_code == 200
        ok = c.post("/v1/predict", json={"inputs": [[0.0] * 64]})
        assert ok.status_code == 200, ok.text


def test_a_chunked_body_under_the_limit_is_served(limited):
    url, meter = limited
    body = b'{"inputs": [' + b",".join([b"[" + b",".join([b"0.5"] * 64) + b"]"] * 4) + b"]}"
    assert len(body) < LIMIT
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/predict", content=iter([body[:100], body[100:]]),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"]) == 4 and "connection" not in r.headers
    assert meter.pulled["/v1/predict"] == len(body)


@pytest.mark.parametrize("method, path", [("PATCH", "/v1/components/c1"),
                                          ("PUT", "/v1/compositions/mix"),
                                          ("PUT", "/v1/components/c1")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token"])
def test_admin_bodies_are_not_read_before_the_token_is_checked(tiny_base_dir, tmp_path,
                                                                method, path, auth):
    # the default body limit (8 MiB) is far over this body: only the token check refuses it
    with metered(settings_for(tiny_base_dir, tmp_path / "r")) as (url, meter), \
            httpx.Client(base_url=url, timeout=30) as c:
        source = Source(2 * 1024 * 1024)
        headers = {"content-type": "application/json"}
        if auth:
            headers["authorization"] = auth
        r = c.request(method, path, content=iter(source), headers=headers)
        assert r.status_code == 401, r.text
        assert "admin" in r.json()["error"]
        assert meter.pulled[path] == 0
        # with the token, the body is read as before
        good = c.request(method, path, json={"weight": 2.0} if method == "PATCH" else
                         {"weights": {}}, headers={"authorization": f"Bearer {ADMIN}"})
        assert good.status_code != 401, good.text
        assert meter.pulled[path] > 0


def _failing_app(settings: Settings) -> FastAPI:
    app = create_app(settings)

    def boom() -> None:
        raise RuntimeError("kaboom")

    app.dependency_overrides[require_inference] = boom  # /v1/predict raises, unexpectedly
    return app


def test_500s_are_counted(tiny_base_dir, tmp_path):
    settings = settings_for(tiny_base_dir, tmp_path / "r")
    with metered(settings, _failing_app(settings)) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        for i in range(3):
            r = c.post("/v1/predict", json={"inputs": [[0.0] * 64]},
                       headers={"X-Request-ID": f"boom-{i}"})
            assert r.status_code == 500 and r.headers["x-request-id"] == f"boom-{i}"
            assert r.json() == {"error": "internal error; see the server log"}
        text = c.get("/metrics").text
    assert 'tmc_requests_total{route="/v1/predict",status="500"} 3.0' in text.splitlines()
    assert 'tmc_request_duration_seconds_count{route="/v1/predict"} 3.0' in text.splitlines()


def test_a_client_that_disconnects_mid_body_is_counted_as_499(tiny_base_dir, tmp_path):
    with metered(settings_for(tiny_base_dir, tmp_path / "r")) as (url, _), \
            httpx.Client(base_url=url, timeout=30) as c:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: "
                      b"application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                      b"5\r\n{\"inp\r\n")
            time.sleep(0.2)  # the app is waiting for the rest of the body: then we go away
        deadline = time.monotonic() + 10
        while metric_sample(c, "tmc_requests_total", route="/v1/predict", status="499") != 1.0:
            assert time.monotonic() < deadline, c.get("/metrics").text
            time.sleep(0.05)
