"""Error handling of the device loop: control calls that fail or hang, a warm-up that fails,
one purge per forget, and a stop that arrives while a batch is being collected."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import save_file
from torch import nn

from app.composition import make_plan
from app.errors import DeviceTimeoutError, NotReadyError, OverloadedError, status_for
from app.service import Service
from app.worker import DeviceWorker, Job
from bases import init_base, make_spec
from tests.app.conftest import component_bytes, free_port, fresh_seed, settings_for
from tests.app.test_worker import _stall, make_worker

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def worker(tiny_base) -> Iterator[DeviceWorker]:
    w = make_worker(tiny_base, {})
    w.start()
    yield w
    w.stop(5.0)


def _boom() -> None:
    raise ValueError("purge broke")


def _in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    """Run fn on a helper thread; the list receives what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # the test inspects it
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, raised


# -- 1. call returns the action's result or raises -------------------------------------------

def test_call_returns_the_result_and_reraises_the_actions_error(worker):
    assert worker.call(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="purge broke"):
        worker.call(_boom, timeout=10.0)
    assert worker._thread.is_alive()  # a failing action does not kill the device thread
    assert worker.call(lambda: "still serving") == "still serving"


def test_call_that_outlives_its_timeout_raises_device_timeout(worker):
    hold = threading.Event()
    worker._queue.put(_stall(hold))  # the device thread is busy: the call cannot run in time
    try:
        with pytest.raises(DeviceTimeoutError, match="0.2 s"):
            worker.call(lambda: None, timeout=0.2)
    finally:
        hold.set()
    assert status_for(DeviceTimeoutError("x")) == 503


def test_call_on_the_device_thread_runs_at_once_and_raises(worker):
    def nested() -> str:  # runs on the device thread: its own call must not queue
        with pytest.raises(ValueError, match="purge broke"):
            worker.call(_boom, timeout=10.0)
        return worker.call(lambda: "inner")

    assert worker.call(nested, timeout=10.0) == "inner"
    with pytest.raises(ValueError, match="purge broke"):
        worker.call(lambda: worker.call(_boom), timeout=10.0)


@pytest.mark.parametrize("started", [False, True], ids=["never-started", "stopped"])
def test_call_on_a_worker_that_is_not_running_raises_at_once(tiny_base, started):
    w = make_worker(tiny_base, {})
    if started:
        w.start()
        w.stop(5.0)
        assert not w._thread.is_alive()
    thread, raised = _in_thread(lambda: w.call(lambda: None, timeout=60.0))
    thread.join(10.0)  # far less than the call's own timeout
    assert not thread.is_alive(), "call waited for a device thread that is not running"
    assert len(raised) == 1 and isinstance(raised[0], NotReadyError), raised
    assert "device worker is not running" in str(raised[0])
    if not started:
        return
    loop = asyncio.new_event_loop()  # a stopped worker refuses jobs too
    try:
        with pytest.raises(OverloadedError):
            w.submit(Job([torch.zeros(64)], make_plan([], 0, "none", False),
                         loop.create_future(), loop))
    finally:
        loop.close()


# -- 4. a stop that arrives while a batch is being collected ----------------------------------

def test_a_stop_during_collection_runs_the_batch_then_exits(tiny_base):
    """The batch still runs, and the thread exits at once: it does not wait for another stop
    (the shutdown would otherwise wait its whole drain timeout)."""
    quick = make_worker(tiny_base, {})
    w = DeviceWorker(quick.executor, tiny_base.preprocessor.collate, quick.metrics, 64,
                     60.0, 64)  # a long queue delay
    w.start()
    x = torch.randn(64)

    async def scenario() -> object:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[object] = loop.create_future()
        w.announce_incoming()  # another request is decoding: the batcher keeps collecting for it
        w.submit(Job([x], make_plan([], 0, "none", False), future, loop))
        await asyncio.to_thread(w.stop, 10.0)
        return await asyncio.wait_for(future, 20.0)

    logits, _ = asyncio.run(scenario())  # type: ignore[misc]
    assert not w._thread.is_alive(), "the device thread lost the stop signal"
    torch.testing.assert_close(logits, tiny_base.net.forward(x[None]), rtol=1e-5, atol=1e-6)


# -- 2. a warm-up forward that fails fails the startup ---------------------------------------

def test_a_failing_warm_up_fails_start_and_the_service_is_not_ready(tiny_base_dir, tmp_path):
    svc = Service.build(settings_for(tiny_base_dir, tmp_path / "r"))

    def fail(*args: object) -> None:
        raise RuntimeError("CUDA out of memory (injected)")

    svc.executor.run = fail  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match=r"warm-up forward failed: .*out of memory"):
            svc.start()
        assert svc.ready is False
        checks = svc.readiness()
        assert checks["warm_forward"] is False and checks["ready"] is False
    finally:
        svc.worker.stop(5.0)
        svc.registry.close()


class Float32Only(nn.Module):
    """A stage that refuses any other dtype (as some real kernels do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"this model runs in float32 only, got {x.dtype}")
        return x


def float32_only_mlp(d: int = 8) -> nn.Sequential:
    """Factory of a generic base that loads (its checks run in float32) but whose warm-up
    forward fails under TMC_DTYPE=bfloat16."""
    return nn.Sequential(OrderedDict([("guard", Float32Only()), ("inp", nn.Linear(d, 8)),
                                      ("act", nn.Tanh()), ("out", nn.Linear(8, 3))]))


def test_tmc_serve_exits_non_zero_with_the_reason_when_the_warm_up_fails(tmp_path):
    weights = tmp_path / "weights.safetensors"
    save_file(dict(float32_only_mlp().state_dict()), str(weights))
    base_dir = tmp_path / "base"
    init_base(base_dir, make_spec("generic", labels=["a", "b", "c"], tangent=["out.*"], options={
        "factory": f"{__name__}:float32_only_mlp", "weights": str(weights),
        "input_shape": [8]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMC_")}
    env.update(TMC_BASE_DIR=str(base_dir), TMC_REGISTRY_DIR=str(tmp_path / "registry"),
               TMC_DEVICE="cpu", TMC_DTYPE="bfloat16", TMC_PORT=str(free_port()),
               TMC_LOG_LEVEL="warning", TMC_LOG_FORMAT="text")  # lines, not JSON
    proc = subprocess.run([sys.executable, "-m", "cli", "serve"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    reason = "warm-up forward failed: this model runs in float32 only, got torch.bfloat16"
    assert any(line.endswith(reason) for line in lines), proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and "did not start" in lines[-1], lines[-1]


# -- 3. a local forget purges the device cache exactly once -----------------------------------

@pytest.fixture
def redis_db(redis_server: str) -> Iterator[str]:
    url = redis_server.rsplit("/", 1)[0] + "/7"  # a database of its own: other tests use 0
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_local_forget_purges_the_device_cache_once(tiny_base_dir, tiny_base, tmp_path,
                                                     request, backend):
    extra = {} if backend == "sqlite" else {
        "redis_url": request.getfixturevalue("redis_db"), "blob_cache_dir": tmp_path / "blobs"}
    svc = Service.build(settings_for(tiny_base_dir, tmp_path / "r", **extra))
    svc.start()
    try:
        added = svc.registry.add("once", component_bytes(tiny_base, fresh_seed()))
        staged = {added.digest: svc.registry.load_tensors(added.digest)}  # read here, and
        svc.worker.call(lambda: svc.executor.component(added.digest, staged))  # cast there
        assert added.digest in svc.executor.components
        purges: list[list[str]] = []
        real_purge = svc.executor.purge

        def counted(digests):
            purges.append(list(digests))
            real_purge(digests)

        svc.executor.purge = counted  # type: ignore[method-assign]
        receipt = svc.forget("once")
        assert purges == [[added.digest]] == [receipt.digests_removed]
        assert added.digest not in svc.executor.components
    finally:
        svc.worker.stop(5.0)
        svc.registry.close()


def test_a_forget_whose_purge_fails_is_an_error_not_a_receipt(tiny_base_dir, tiny_base,
                                                              tmp_path):
    svc = Service.build(settings_for(tiny_base_dir, tmp_path / "r"))
    svc.start()
    try:
        svc.registry.add("p", component_bytes(tiny_base, fresh_seed()))
        svc.executor.purge = lambda digests: _boom()  # type: ignore[method-assign]
        with pytest.raises(ValueError, match="purge broke"):
            svc.forget("p")
        assert svc.worker._thread.is_alive()
    finally:
        svc.worker.stop(5.0)
        svc.registry.close()
