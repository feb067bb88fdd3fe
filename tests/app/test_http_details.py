"""HTTP details (issue 14 item 8): Allow on 405, a valid OpenAPI document that documents the
error statuses routes answer, the id rule for ids with '/' or '..', JSON errors for
malformed JSON, client disconnects as client events, slow-header clients timed out, and a
full disk answered 507."""

from __future__ import annotations

import errno
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
import uvicorn

import registry
import registry.file_blobs
from app.errors import status_for
from app.main import create_app
from app.settings import Settings
from cli.serve import KEEP_ALIVE_S, MAX_HEAD_BYTES, uvicorn_options
from tests.app.conftest import (
    ADMIN,
    component_bytes,
    free_port,
    fresh_seed,
    metric_sample,
    settings_for,
    uvicorn_in_thread,
)
from tests.app.test_weights_and_v2 import v2_body, v2_url

ID_RULE = "[a-z0-9._-]"
AUTH = {"authorization": f"Bearer {ADMIN}"}


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


# --- a. 405 carries Allow -------------------------------------------------------------------

def test_405_names_the_allowed_methods(client):
    r = client.delete("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()
    assert r.headers["allow"] == "POST"
    r = client.post("/healthz")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


# --- b, e. the OpenAPI document -------------------------------------------------------------

def test_every_ref_in_the_openapi_document_resolves(client):
    doc = client.get("/openapi.json").json()
    refs = set(_refs(doc))
    assert "#/components/schemas/V2Request" in refs
    for ref in refs:
        _resolve(doc, ref)
    v2 = _resolve(doc, "#/components/schemas/V2Request")
    tensor = _resolve(doc, v2["properties"]["inputs"]["items"]["$ref"])
    assert set(tensor["required"]) == {"name", "shape", "datatype"}


MUST_DOCUMENT = {
    ("post", "/v1/predict"): {400, 401, 404, 413, 422, 503, 504},
    ("post", "/v2/models/{model}/infer"): {400, 401, 404, 413, 422, 503, 504},
    ("get", "/v2/models/{model}"): {401, 404, 503},
    ("get", "/v1/base"): {401, 503},
    ("put", "/v1/components/{cid}"): {400, 401, 403, 409, 413, 422, 503, 507},
    ("get", "/v1/components/{cid}"): {400, 401, 403, 404},
    ("patch", "/v1/components/{cid}"): {400, 401, 403, 404, 413, 422, 507},
    ("delete", "/v1/components/{cid}"): {400, 401, 403, 404, 503},
    ("get", "/v1/components"): {401, 403},
    ("put", "/v1/compositions/{name}"): {400, 401, 403, 409, 413, 422},
    ("get", "/v1/compositions/{name}"): {400, 401, 403, 404},
    ("delete", "/v1/compositions/{name}"): {400, 401, 403, 404},
    ("get", "/v1/compositions"): {401, 403},
    ("get", "/readyz"): {503},
}


def test_openapi_documents_the_error_statuses_and_their_json_body(client):
    doc = client.get("/openapi.json").json()
    for (method, path), statuses in MUST_DOCUMENT.items():
        documented = {int(s) for s in doc["paths"][path][method]["responses"]}
        assert statuses <= documented, f"{method} {path}: {statuses - documented} missing"
    error_ref = "#/components/schemas/ErrorBody"
    assert _resolve(doc, error_ref)["required"] == ["error"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")) and path != "/readyz":  # readyz: its checks
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": error_ref}, (method, path, status)


def _operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    """The operation whose path template matches a concrete path."""
    parts = path.split("?")[0].split("/")
    for template, ops in doc["paths"].items():
        tparts = template.split("/")
        if method.lower() in ops and len(tparts) == len(parts) and all(
                t == p or (t.startswith("{") and p) for t, p in zip(tparts, parts, strict=True)):
            return ops[method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"no operation for {method} {path}")


def test_the_statuses_routes_answer_are_documented(admin_client, client, tiny_base):
    """Drive each route into its errors through real HTTP; every status that comes back is
    one its operation documents."""
    doc = client.get("/openapi.json").json()
    data = component_bytes(tiny_base, fresh_seed())
    other = tiny_base.spec.name + "-other"
    calls: list[tuple[httpx.Client, str, str, dict[str, Any]]] = [
        (client, "POST", "/v1/predict", {"content": b"{nope"}),
        (client, "POST", "/v1/predict", {"json": {"inputs": []}}),
        (client, "POST", "/v1/predict", {"json": {"inputs": [[0.0] * 64],
                                                  "components": {"missing": 1}}}),
        (client, "POST", "/v1/predict", {"content": b"[" + b"0," * (5 << 20) + b"0]"}),
        (client, "POST", "/v1/predict", {"json": {"inputs": "x"}}),
        (client, "POST", v2_url(tiny_base), {"content": b"{nope"}),
        (client, "POST", f"/v2/models/{other}/infer", {"json": v2_body()}),
        (client, "POST", v2_url(tiny_base), {"json": {"inputs": []}}),
        (client, "GET", f"/v2/models/{other}", {}),
        (client, "GET", f"/v2/models/{other}/ready", {}),
        (client, "GET", "/v1/components", {}),
        (client, "PUT", "/v1/components/c1", {"content": data}),
        (admin_client, "PUT", "/v1/components/Bad_Id", {"content": data}),
        (admin_client, "PUT", "/v1/components/c1", {"content": b""}),
        (admin_client, "PUT", "/v1/components/c1", {"content": b"not safetensors"}),
        (admin_client, "PUT", "/v1/components/c1", {"content": data}),
        (admin_client, "PUT", "/v1/components/c2", {"content": data}),  # same bytes: 409
        (admin_client, "GET", "/v1/components/nope", {}),
        (admin_client, "GET", "/v1/components?active=maybe", {}),
        (admin_client, "PATCH", "/v1/components/nope", {"json": {"weight": 2}}),
        (admin_client, "PATCH", "/v1/components/c1", {"json": {}}),
        (admin_client, "PATCH", "/v1/components/c1", {"content": b"{nope"}),
        (admin_client, "DELETE", "/v1/components/nope", {}),
        (admin_client, "PUT", "/v1/compositions/m", {"json": {"weights": {"nope": 1}}}),
        (admin_client, "PUT", "/v1/compositions/m", {"json": {"weights": {"c1": 1},
                                                             "expected_generation": 999}}),
        (admin_client, "PUT", "/v1/compositions/m", {"json": {"weights": 5}}),
        (admin_client, "GET", "/v1/compositions/nope", {}),
        (admin_client, "DELETE", "/v1/compositions/nope", {}),
        (admin_client, "GET", "/v1/compositions/Bad", {}),
    ]
    seen = set()
    for c, method, path, kw in calls:
        if "content" in kw and method != "PUT":
            kw = {**kw, "headers": {"content-type": "application/json"}}
        r = c.request(method, path, **kw)
        assert r.status_code >= 400 or (method, path) == ("PUT", "/v1/components/c1"), path
        documented = _operation(doc, method, path)["responses"]
        assert str(r.status_code) in documented, (method, path, r.status_code, r.text)
        seen.add(r.status_code)
    assert {400, 401, 404, 409, 413, 422} <= seen


# --- c. ids with '/' or '..' ----------------------------------------------------------------

@pytest.mark.parametrize("method", ["PUT", "GET", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/components/a%2Fb", "/v1/components/a/b",
                                  "/v1/components/%2E%2E", "/v1/components/..%2F..%2Fx",
                                  "/v1/compositions/a%2Fb",
                                  # newlines: "ab\n" was stored as "ab", "a\nb" was a bare 404
                                  "/v1/components/ab%0A", "/v1/components/a%0Ab",
                                  "/v1/compositions/ab%0A"])
def test_ids_with_slashes_or_dots_get_the_id_rule(admin_client, tiny_base, method, path):
    if "compositions" in path and method == "PATCH":
        method = "PUT"
    kw: dict[str, Any] = {}
    if method == "PUT":
        kw = ({"json": {"weights": {}}} if "compositions" in path
              else {"content": component_bytes(tiny_base, fresh_seed())})
    elif method == "PATCH":
        kw = {"json": {"weight": 2.0}}
    r = admin_client.request(method, path, **kw)
    assert r.status_code == 400, r.text
    assert ID_RULE in r.json()["error"] and "is invalid" in r.json()["error"]


def test_a_literal_dot_dot_segment_gets_the_id_rule(server):
    """httpx (like curl) removes dot segments; a raw client may send them as is."""
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET /v1/components/.. HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                  f"{ADMIN}\r\nconnection: close\r\n\r\n".encode())
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert ID_RULE.encode() in answer


def test_listing_paths_still_redirect_and_metrics_keep_the_route_template(admin_client):
    r = admin_client.get("/v1/components/", follow_redirects=False)
    assert r.status_code == 307
    assert admin_client.get("/v1/components/nope").status_code == 404
    metrics = admin_client.get("/metrics").text
    assert 'tmc_requests_total{route="/v1/components/{cid}",status="404"}' in metrics
    assert "anyid" not in metrics


# --- d. malformed JSON ----------------------------------------------------------------------

@pytest.mark.parametrize("path, status", [("/v1/predict", 422), ("V2", 400)])
def test_malformed_json_says_where(client, tiny_base, path, status):
    url = v2_url(tiny_base) if path == "V2" else path
    r = client.post(url, content=b'{"inputs": [1,\n  oops]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.json() == {"error": "request body is not valid JSON: Expecting value at line 2 "
                                 "column 3"}


def test_malformed_json_on_admin_routes_and_bad_utf8(admin_client, client):
    r = admin_client.patch("/v1/components/c1", content=b"{\"weight\": }",
                           headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"] == ("request body is not valid JSON: Expecting value at line 1 "
                                 "column 12")
    r = client.post("/v1/predict", content=b'{"inputs": ["\xff"]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"].startswith("request body is not valid JSON: 'utf-8' codec")


# --- f. a client that goes away mid-upload --------------------------------------------------

def test_a_client_that_disconnects_mid_upload_is_a_client_event(server, client, caplog):
    caplog.set_level(logging.INFO)
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"PUT /v1/components/gone HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
                  f"{ADMIN}\r\ncontent-length: 100000\r\n\r\n".encode() + b"x" * 1000)
        time.sleep(0.3)  # the route is streaming the body: then we go away
    route = "/v1/components/{cid}"
    deadline = time.monotonic() + 10
    while metric_sample(client, "tmc_requests_total", route=route, status="499") != 1.0:
        assert time.monotonic() < deadline, client.get("/metrics").text
        time.sleep(0.05)
    assert metric_sample(client, "tmc_requests_total", route=route, status="500") == 0.0
    ours = [r for r in caplog.records if r.name.startswith("tmc")]
    assert not [r for r in ours if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in ours]
    gone = [r for r in ours if "client disconnected" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno in (logging.INFO, logging.WARNING)
    assert "/v1/components/gone" in gone[0].getMessage()


# --- g. slow clients ------------------------------------------------------------------------

@contextmanager
def cli_server(settings: Settings, head_timeout_s: float) -> Iterator[int]:
    """create_app served with the uvicorn options `tmc serve` uses."""
    options = uvicorn_options(settings, head_timeout_s=head_timeout_s)
    options.update(host="127.0.0.1", port=free_port(), log_level="warning")
    options.pop("workers")
    with uvicorn_in_thread(uvicorn.Config(create_app(settings), lifespan="on", **options)):
        yield int(options["port"])


def _read_all(s: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything until the server closes (bounded in time)."""
    s.settimeout(limit_s)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_uvicorn_options_bound_slow_and_large_heads(tiny_base_dir, tmp_path):
    settings = settings_for(tiny_base_dir, tmp_path / "r")
    options = uvicorn_options(settings)
    assert options["timeout_keep_alive"] == KEEP_ALIVE_S
    assert options["h11_max_incomplete_event_size"] == MAX_HEAD_BYTES
    with cli_server(settings, head_timeout_s=0.5) as port, ExitStack() as sockets:
        slow = [sockets.enter_context(socket.create_connection(("127.0.0.1", port)))
                for _ in range(10)]
        silent = sockets.enter_context(socket.create_connection(("127.0.0.1", port)))
        started = time.monotonic()
        for s in slow:
            s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")  # never the blank line
        answers = [_read_all(s) for s in slow]
        assert _read_all(silent) == b""  # nothing came: closed without an answer
        elapsed = time.monotonic() - started
        assert 0.4 < elapsed < 5, elapsed
        for a in answers:
            assert a.startswith(b"HTTP/1.1 408 "), a
            assert b'"error": "request head not received within 0.5 s"' in a

        # a head completed within the timeout is served; after the response the connection
        # waits for the next head under the same timeout (a byte does not reset it)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.2)
            s.sendall(b"host: x\r\n\r\n")
            s.settimeout(5)
            first = b""
            while not first.endswith(b'{"status":"live"}'):
                chunk = s.recv(65536)
                assert chunk, first
                first += chunk
            assert first.startswith(b"HTTP/1.1 200 "), first
            s.sendall(b"G")
            started = time.monotonic()
            assert _read_all(s).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 5

        # a head over MAX_HEAD_BYTES, or one h11 cannot parse: 400 with the JSON error body
        for head in (b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 1),
                     b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/1.1\r\nbad header\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(head)
                answer = _read_all(s)
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert b"content-type: application/json" in answer.lower()
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"].startswith(
                "invalid HTTP request: ")

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert c.get("/healthz").status_code == 200  # still serving


# --- h. disk full ---------------------------------------------------------------------------

def test_a_full_disk_answers_507_without_retry_after(admin_client, tiny_base, monkeypatch):
    real_open = open

    def full_disk_open(file: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kw)

    data = component_bytes(tiny_base, fresh_seed())
    monkeypatch.setattr(registry.file_blobs, "open", full_disk_open, raising=False)
    r = admin_client.put("/v1/components/full", content=data)
    assert r.status_code == 507, r.text
    assert "retry-after" not in r.headers
    assert r.json()["error"].startswith("insufficient storage: ")
    assert "No space left on device" in r.json()["error"]
    monkeypatch.undo()
    assert admin_client.put("/v1/components/full", content=data).status_code == 201


def test_disk_full_is_found_in_the_cause_chain():
    def storage_error(cause: BaseException) -> registry.StorageError:
        try:
            raise registry.StorageError(f"registry: {cause}") from cause
        except registry.StorageError as exc:
            return exc

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert status_for(storage_error(full)) == 507
    assert status_for(storage_error(OSError(errno.EDQUOT, "Disk quota exceeded"))) == 507
    assert status_for(storage_error(OSError(errno.EIO, "I/O error"))) == 503
    assert status_for(storage_error(sqlite3.OperationalError("database is locked"))) == 503

