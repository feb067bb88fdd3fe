"""A readiness probe never holds the event loop: its registry and blob store round trips run
on a thread, so while a store hangs (an S3 ``head_bucket`` may take its 1 s connect + 2 s read
timeout on every probe) liveness, inference and the other probes are still answered.

The server is the real app in uvicorn over the embedded registry; ``Registry.ping_blobs``
is wrapped to wait, inside the probe, until the test lets it go (a store that hangs), then
runs the real check. The old routes called ``Service.readiness`` on the event loop: /healthz
was answered only after the hanging probe, so the probe was already done when it came back.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
import uvicorn

from app.main import create_app
from app.service import Service
from tests.app.conftest import free_port, settings_for, uvicorn_in_thread

HANG_LIMIT_S = 20.0  # a probe held longer than this goes on (so a failing test ends)


class HangingBlobProbe:
    """Registry.ping_blobs of one service, held until ``release`` (then the real one)."""

    def __init__(self, svc: Service) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        real = svc.registry.ping_blobs

        def ping_blobs() -> None:
            self.entered.set()
            self.release.wait(HANG_LIMIT_S)
            real()

        svc.registry.ping_blobs = ping_blobs  # type: ignore[method-assign]


@pytest.mark.parametrize("probe", ["/readyz", "/v2/health/ready", "/v2/models/{model}/ready"])
def test_a_hanging_readiness_probe_leaves_the_event_loop_free(tiny_base_dir: Path,
                                                              tmp_path: Path, probe: str) -> None:
    settings = settings_for(tiny_base_dir, tmp_path / "r")
    svc = Service.build(settings)
    hang = HangingBlobProbe(svc)
    port = free_port()
    config = uvicorn.Config(create_app(settings, svc), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    answers: list[httpx.Response] = []
    with uvicorn_in_thread(config), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                 timeout=60) as c:
        path = probe.format(model=svc.base.spec.name)
        asking = threading.Thread(target=lambda: answers.append(
            httpx.get(f"http://127.0.0.1:{port}{path}", timeout=60)))
        asking.start()
        try:
            assert hang.entered.wait(30), "the probe never reached the blob store"
            assert c.get("/healthz").status_code == 200
            x = [[0.5] * 64]
            assert c.post("/v1/predict", json={"inputs": x}).status_code == 200
            probe_done_meanwhile = not asking.is_alive()
        finally:
            hang.release.set()
            asking.join(60)
    assert not probe_done_meanwhile, "the hanging probe held the event loop"
    assert [r.status_code for r in answers] == [200], [r.text for r in answers]
