"""Fixtures for service tests: tiny real bases, component files, a live uvicorn server."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from app.main import create_app
from app.settings import Settings
from bases import Base, init_base, load_base, make_spec
from loopback.ports import free_port
from tangent import encode_component
from tests.conftest_redis import redis_server  # noqa: F401
from tests.conftest_s3 import s3_server  # noqa: F401

ADMIN = "admin-token-0123456789"


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bases") / "tiny"
    init_base(out, make_spec("tiny-mlp", head_seed=3))
    return out


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir: Path) -> Base:
    return load_base(tiny_base_dir)


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def random_delta(base: Base, seed: int, scale: float = 0.1,
                 names: list[str] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    chosen = names or list(base.region)
    return {n: torch.randn(base.region[n].shape, generator=g) * scale for n in chosen}


def component_bytes(base: Base, seed: int, **kw: object) -> bytes:
    delta = random_delta(base, seed, **kw)  # type: ignore[arg-type]
    return encode_component(delta, base.fingerprint, {"seed": seed, "data": "random"})


def settings_for(base_dir: Path, registry_dir: Path, **kw: object) -> Settings:
    values: dict[str, object] = dict(base_dir=base_dir, registry_dir=registry_dir,
                                     admin_token=ADMIN, device="cpu", max_queue_delay_ms=2.0)
    values.update(kw)
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def uvicorn_in_thread(config: uvicorn.Config) -> Iterator[uvicorn.Server]:
    """Run a uvicorn server on a thread until the block ends (it must bind to loopback)."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """Serve create_app(settings) through uvicorn on a free loopback port."""
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                            log_level="warning", lifespan="on")
    with uvicorn_in_thread(config):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def server(tiny_base_dir: Path, tmp_path: Path) -> Iterator[str]:
    with live_server(settings_for(tiny_base_dir, tmp_path / "registry")) as url:
        yield url


@pytest.fixture
def admin_client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers={"authorization": f"Bearer {ADMIN}"},
                      timeout=30) as c:
        yield c


@pytest.fixture
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def metric_sample(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0.0 when the series does not exist yet)."""
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
