"""Structured logs through real HTTP: request ids, lifecycle lines, no secrets in the log;
and one request deadline that covers every re-plan."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from app.composition import AllActive
from app.errors import RequestTimeoutError, status_for
from app.logs import (
    REQUEST_ID,
    SERVER_LOGGERS,
    TextFormatter,
    accept_request_id,
    actor,
    resolve_format,
    setup_logging,
)
from app.main import create_app
from app.service import Service
from app.worker import Control
from tangent import encode_component
from tests.app.conftest import (
    ADMIN,
    component_bytes,
    free_port,
    fresh_seed,
    random_delta,
    settings_for,
)

REPO = Path(__file__).resolve().parents[2]
GENERATED = re.compile(r"[0-9a-f]{32}")
BODY_MARKER = "0.123456789"  # an input value: must never appear in a log line


@dataclass
class Served:
    """A `python -m cli serve` process and the lines of its stderr, as they come."""

    url: str
    proc: subprocess.Popen[bytes]
    raw: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.raw):
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], limit_s: float = 10.0
                 ) -> dict[str, Any]:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            for rec in self.records():
                if pred(rec):
                    return rec
            time.sleep(0.02)
        raise AssertionError(f"no such log line; got:\n{''.join(self.raw)[-3000:]}")


@contextmanager
def serve_process(base_dir: Path, registry_dir: Path, **env: str) -> Iterator[Served]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("TMC_")}
    full.update({"TMC_BASE_DIR": str(base_dir), "TMC_REGISTRY_DIR": str(registry_dir),
                 "TMC_ADMIN_TOKEN": ADMIN, "TMC_DEVICE": "cpu", "TMC_PORT": str(port),
                 "TMC_LOG_FORMAT": "json", **env})
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=full, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    served = Served(f"http://127.0.0.1:{port}", proc)
    assert proc.stderr is not None
    stderr = proc.stderr
    reader = threading.Thread(target=lambda: served.raw.extend(
        iter(lambda: stderr.readline().decode(), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited: {''.join(served.raw)[-2000:]}"
            assert time.monotonic() < deadline, "server not ready in time"
            try:
                if httpx.get(f"{served.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(10)
        stderr.close()


@pytest.fixture(scope="module")
def served(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serve_process(tiny_base_dir, tmp_path_factory.mktemp("logs") / "registry") as s:
        yield s


def _inputs(rows: int = 2) -> list[list[float]]:
    x = torch.randn(rows, 64).tolist()
    x[0][0] = float(BODY_MARKER)
    return x


# -- request ids -------------------------------------------------------------------------------

def test_a_given_request_id_is_echoed_and_on_the_requests_log_lines(served: Served):
    r = httpx.post(f"{served.url}/v1/predict", json={"inputs": _inputs()},
                   headers={"X-Request-ID": "abc-123"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    line = served.wait_for(lambda rec: rec.get("request_id") == "abc-123")
    assert line["logger"] == "uvicorn.access" and line["status"] == 200
    assert line["path"] == "/v1/predict" and line["method"] == "POST"
    # an error response carries its id too
    r = httpx.post(f"{served.url}/v1/predict", json={"inputs": _inputs(),
                                                       "components": {"nope": 1.0}},
                   headers={"X-Request-ID": "err.42_x"}, timeout=30)
    assert r.status_code == 404 and r.headers["x-request-id"] == "err.42_x"
    assert served.wait_for(lambda rec: rec.get("request_id") == "err.42_x")["status"] == 404


def test_a_missing_or_invalid_request_id_is_replaced_by_a_generated_one(served: Served):
    seen = set()
    for given in (None, "bad id!", "x" * 129, ""):
        headers = {} if given is None else {"X-Request-ID": given}
        r = httpx.get(f"{served.url}/v1/components", headers=headers, timeout=30)
        assert r.status_code == 401  # an error, no admin token: the id is still there
        rid = r.headers["x-request-id"]
        assert GENERATED.fullmatch(rid), rid
        seen.add(rid)
        served.wait_for(lambda rec, rid=rid: rec.get("request_id") == rid)
    assert len(seen) == 4
    assert accept_request_id("A" * 128) == "A" * 128


def test_admin_put_and_delete_log_lifecycle_lines_without_secrets(served: Served, tiny_base):
    auth = {"authorization": f"Bearer {ADMIN}"}
    data = encode_component(random_delta(tiny_base, fresh_seed()), tiny_base.fingerprint,
                            {"marker": "BODY-MARKER-in-the-upload"})
    with httpx.Client(base_url=served.url, headers=auth, timeout=30) as c:
        put = c.put("/v1/components/logged", content=data)
        assert put.status_code == 201, put.text
        added = served.wait_for(lambda rec: rec.get("event") == "add"
                                and rec.get("component") == "logged")
        assert added["digest"] == put.json()["digest"]
        assert added["generation"] == put.json()["generation"]
        assert added["request_id"] == put.headers["x-request-id"]
        patch = c.patch("/v1/components/logged", json={"weight": 0.5})
        assert patch.status_code == 200
        rew = served.wait_for(lambda rec: rec.get("event") == "reweight")
        assert rew["component"] == "logged" and rew["weight"] == 0.5
        deleted = c.delete("/v1/components/logged", headers={"X-Request-ID": "forget-1"})
        assert deleted.status_code == 200, deleted.text
        gone = served.wait_for(lambda rec: rec.get("event") == "forget")
    assert gone["component"] == "logged" and gone["request_id"] == "forget-1"
    assert gone["digests"] == [put.json()["digest"]]
    assert gone["generation"] == deleted.json()["generation"] > added["generation"]
    for rec in (added, rew, gone):
        assert rec["who"] == actor(f"Bearer {ADMIN}") and ADMIN not in rec["who"]
    # a predict with the marker in its body, then: no secret and no body anywhere in the log
    httpx.post(f"{served.url}/v1/predict", json={"inputs": _inputs()}, timeout=30)
    served.wait_for(lambda rec: rec.get("path") == "/v1/predict")
    text = "".join(served.raw)
    assert ADMIN not in text
    assert "BODY-MARKER" not in text and BODY_MARKER not in text


def test_startup_ready_and_shutdown_lines_and_debug_reaches_the_worker(tiny_base_dir, tmp_path):
    """A fresh server at TMC_LOG_LEVEL=debug: the tmc.* lines print (startup, ready — and the
    device worker's debug line for a request, carrying its id); SIGTERM logs the drain."""
    with serve_process(tiny_base_dir, tmp_path / "registry", TMC_LOG_LEVEL="debug") as s:
        r = httpx.post(f"{s.url}/v1/predict", json={"inputs": _inputs()},
                       headers={"X-Request-ID": "dbg-1"}, timeout=30)
        assert r.status_code == 200
        ran = s.wait_for(lambda rec: rec.get("message") == "group ran")
        assert ran["logger"] == "tmc.worker" and ran["level"] == "DEBUG"
        assert ran["request_ids"] == ["dbg-1"]
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    by_event = {rec["event"]: rec for rec in s.records() if "event" in rec}
    for event in ("startup", "ready"):
        rec = by_event[event]
        assert rec["level"] == "INFO" and rec["logger"] == "tmc"
        assert rec["base"] == "tiny-mlp" and rec["device"] == "cpu"
        assert rec["dtype"] == "float32" and rec["compile"] == "none"
        assert rec["registry"] == "sqlite" and rec["generation"] == 0
        assert len(rec["base_fingerprint"]) == 12 and "time" in rec
    assert {"drain_start", "drain_end", "shutdown"} <= by_event.keys()


# -- in-process: the 500 path, and the pieces ---------------------------------------------------

def test_an_unexpected_error_is_a_500_with_the_id_logged_with_it(tiny_base_dir, tmp_path,
                                                                 capsys):
    app = create_app(settings_for(tiny_base_dir, tmp_path / "r"))

    async def boom() -> None:
        raise RuntimeError("kaboom")

    app.add_api_route("/boom", boom)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.get(f"http://127.0.0.1:{port}/boom", headers={"X-Request-ID": "boom-1"},
                      timeout=30)
    finally:
        server.should_exit = True
        thread.join(30)
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json() == {"error": "internal error; see the server log"}
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    err = [rec for rec in lines if rec.get("request_id") == "boom-1" and rec["level"] == "ERROR"]
    assert err and "kaboom" in err[0]["exc_info"]


def test_log_level_reaches_tmc_loggers_and_format_auto(monkeypatch):
    try:
        setup_logging("debug", "json")
        for name in ("tmc", "tmc.worker", "tmc.service", "tmc.admin", "uvicorn.access"):
            assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name
        setup_logging("warning", "json")
        assert not logging.getLogger("tmc.service").isEnabledFor(logging.INFO)
        installed = [h for h in logging.getLogger().handlers if getattr(h, "_tmc_handler", 0)]
        assert len(installed) == 1  # idempotent: one handler, however often it is set up
    finally:
        setup_logging("info", "auto")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("text", io.StringIO()) == "text"
    for name in SERVER_LOGGERS:
        assert logging.getLogger(name).propagate


def test_text_format_carries_the_request_id_and_extras():
    record = logging.LogRecord("tmc.admin", logging.INFO, __file__, 1, "component %s added",
                               ("c1",), None)
    record.event, record.request_id = "add", "abc-123"
    line = TextFormatter().format(record)
    assert "tmc.admin: component c1 added" in line
    assert "event=add" in line and "request_id=abc-123" in line


def test_actor_is_a_hash_prefix_never_the_token():
    who = actor(f"Bearer {ADMIN}")
    assert who.startswith("token-sha256:") and len(who.split(":")[1]) == 8
    assert ADMIN not in who and who != actor("Bearer another-token-0123456789")
    assert actor(None) == "anonymous" == actor("Basic abc")
    assert REQUEST_ID.get() is None


# -- issue 17 item 5: one deadline per request --------------------------------------------------

def test_the_request_timeout_is_one_deadline_across_replans(tiny_base_dir, tmp_path, tiny_base):
    """Each round, the pinned version is forgotten before it runs (a re-plan), after the device
    was busy for 0.3 s: with a 0.5 s timeout the request gets its 504 at about 0.5 s — not after
    four rounds of up to 0.5 s each (the old per-await timeout)."""
    svc = Service.build(settings_for(tiny_base_dir, tmp_path / "r", request_timeout_s=0.5))
    svc.start()
    try:
        svc.registry.add("victim", component_bytes(tiny_base, fresh_seed()))
        stale = svc.resolve(AllActive(), None)
        svc.forget("victim")
        rounds: list[float] = []

        def stale_and_slow(spec, normalize, explain=False):
            rounds.append(time.monotonic())
            svc.worker._queue.put(Control(partial(time.sleep, 0.3)))  # the device is busy
            return stale

        svc.resolve = stale_and_slow  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="within 0.5 s"):
            asyncio.run(svc.predict(torch.randn(2, 64).tolist(), AllActive(), None, False))
        assert time.monotonic() - started < 1.0
        assert len(rounds) >= 2  # a re-plan did happen within the one deadline
        assert status_for(RequestTimeoutError("x")) == 504
    finally:
        svc.worker.stop(5.0)
        svc.registry.close()
