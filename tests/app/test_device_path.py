"""The device path's contracts that hold on any device: one wait per batch, no inference
mode around the JVP, and a startup self-check that refuses a setup whose J·Δ is zero."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch

from app.executor import Executor
from app.service import Service
from tangent import UnsupportedOpError
from tests.app.conftest import fresh_seed, random_delta, settings_for
from tests.app.test_worker import _stall, make_worker, plan_for, run_jobs


def own_executor(base, tensors):
    """An executor over a copy of the session's network: these tests patch its methods."""
    return Executor(copy.deepcopy(base.net), tensors.__getitem__, torch.device("cpu"),
                    torch.float32, 1 << 24)


def test_a_batch_of_three_groups_waits_for_the_device_once(tiny_base):
    tensors = {f"d{i}": random_delta(tiny_base, fresh_seed()) for i in range(3)}
    worker = make_worker(tiny_base, tensors)
    waits: list[int] = []
    real_sync = worker.executor.synchronize
    worker.executor.synchronize = lambda: waits.append(1) or real_sync()  # type: ignore[method-assign]
    worker.start()
    hold = threading.Event()
    worker._queue.put(_stall(hold))  # everything below lands in one batch
    plans = [plan_for([("d0", 1.0)]), plan_for([("d1", 1.0)]), plan_for([("d2", -1.0)])]
    xs = [torch.randn(64) for _ in range(3)]
    jobs = [([x], p) for x, p in zip(xs, plans, strict=True)]
    results = asyncio.run(run_jobs(worker, jobs, hold))
    worker.stop(5)
    assert waits == [1]
    for x, plan, (logits, _) in zip(xs, plans, results, strict=True):
        want = tiny_base.net.forward(x[None], worker.executor.composed_delta(plan))
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)


def test_the_tail_never_runs_under_inference_mode(tiny_base):
    """torch.func.jvp returns zero tangents under inference mode before torch 2.12
    (pytorch#177318): the executor must run it under no_grad, on every torch."""
    seen: list[bool] = []
    tensors = {"d": random_delta(tiny_base, fresh_seed())}
    ex = own_executor(tiny_base, tensors)
    real = ex.net.tail_jvp

    def spy(h, delta):
        seen.append(torch.is_inference_mode_enabled())
        return real(h, delta)

    ex.net.tail_jvp = spy  # type: ignore[method-assign]
    x = torch.randn(2, 64)
    ex.run(plan_for([("d", 1.0)]), x)
    ex.explain(plan_for([("d", 0.5)]), x)
    ex.check_linearization(x)
    assert seen and not any(seen)


def test_a_setup_whose_jvp_is_zero_is_refused_at_startup(tiny_base_dir, tmp_path, monkeypatch):
    """A torch build that drops tangents would serve θ0 for every composition: the warm-up's
    self-check refuses to start instead, and says why."""
    from tangent.linearize import LinearizedNet

    real = LinearizedNet.tail_jvp

    def dropped(self, h, delta):
        y0, dy = real(self, h, delta)
        return y0, torch.zeros_like(dy)

    monkeypatch.setattr(LinearizedNet, "tail_jvp", dropped)
    service = Service.build(settings_for(tiny_base_dir, tmp_path / "reg"))
    with pytest.raises(RuntimeError, match=r"warm-up forward failed: .*J·Δ = 0"):
        service.start()
    assert not service.ready
    service.registry.close()


def test_check_linearization_passes_on_a_working_setup(tiny_base):
    ex = own_executor(tiny_base, {})
    ex.check_linearization(torch.randn(3, 64))  # no error


def test_check_linearization_names_a_non_finite_jvp(tiny_base):
    ex = own_executor(tiny_base, {})
    real = ex.net.tail_jvp
    ex.net.tail_jvp = lambda h, d: (real(h, d)[0], torch.full((1, 1), float("nan")))  # type: ignore[method-assign]
    with pytest.raises(UnsupportedOpError, match="non-finite"):
        ex.check_linearization(torch.randn(1, 64))




def test_a_service_with_a_compiled_tail_serves_what_eager_serves(tiny_base_dir, tmp_path):
    """TMC_COMPILE=tail end to end: the warm-up compiles (and self-checks) it, and a
    composition's logits match the eager network's."""
    import torch._dynamo

    torch._dynamo.reset()
    service = Service.build(settings_for(tiny_base_dir, tmp_path / "reg", compile="tail"))
    try:
        service.start()
        assert service.ready and service.executor.net.compile_mode == "tail"
        delta = random_delta(service.base, fresh_seed())
        service.executor.components.put("d", {n: t.clone() for n, t in delta.items()}, ["d"])
        x = torch.randn(3, 64)
        got = service.worker.call(lambda: service.executor.run(plan_for([("d", 0.5)]), x))
        eager = copy.deepcopy(service.base.net)
        eager.compile("none")
        want = eager.forward(x, {n: t * 0.5 for n, t in delta.items()})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        service.worker.stop(5)
        service.registry.close()
        torch._dynamo.reset()
