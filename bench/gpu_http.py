"""GPU check, serving section: `tmc serve` over real HTTP against the offline executor."""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bases import Base
from bench import common, processes
from bench.gpu_common import Components, executor_for, plan_of


@dataclass(frozen=True)
class HttpLoad:
    concurrency: int
    duration_s: float
    offline_repeats: int
    offline_budget_s: float


def check_http(base_dir: Path, base: Base, payload: Path | None, device: torch.device,
               load_spec: HttpLoad, workdir: Path) -> dict[str, Any]:
    from bench import http_load, serving

    images = _png_images(payload, 64)
    env = {"TMC_DEVICE": device.type, "TMC_MAX_BATCH_SIZE": str(max(64, load_spec.concurrency)),
           "TMC_LOG_LEVEL": "warning"}
    with processes.tmc_server(base_dir, workdir / "server", env=env) as server:
        by_digest, ids = serving.push_components(server, base.region, base.fingerprint)
        comp = serving.compositions()[0]
        bodies = [http_load.request_bytes(server.port, {"inputs": [img], "components": comp,
                                                        "top_k": 1}) for img in images]
        per_client = [http_load.rotate(bodies, i) for i in range(load_spec.concurrency)]
        asyncio.run(serving.prime(server, [bodies]))
        warm = min(2.0, load_spec.duration_s / 3)
        load = asyncio.run(http_load.run_level(server, per_client, 1, warm,
                                               load_spec.duration_s))
        eight = [http_load.request_bytes(server.port, {
            "inputs": [images[(j * 8 + i) % len(images)] for i in range(8)],
            "components": comp, "top_k": 1}) for j in range(len(images))]
        load8 = asyncio.run(http_load.run_level(
            server, [http_load.rotate(eight, i) for i in range(load_spec.concurrency)], 8,
            warm, load_spec.duration_s))
    comps = Components()
    comps.by_digest.update(by_digest)
    ex = executor_for(base, comps, device, torch.float32)
    plan = plan_of({ids[cid]: w for cid, w in comp.items()})
    items = base.preprocessor.decode_inputs([base64.b64decode(i) for i in images])
    mean_batch = max(1, round(load.get("mean_batch_size") or 1))
    batches = sorted({1, mean_batch, load_spec.concurrency})
    cases = [common.Case(f"offline|{b}", partial(
        ex.run, plan, base.preprocessor.collate([items[i % len(items)] for i in range(b)])))
        for b in batches]
    timings = common.run_rounds(cases, load_spec.offline_repeats,
                                budget_s=load_spec.offline_budget_s)
    offline = {str(b): b / common.summarize(timings.wall[f"offline|{b}"])["median"]
               for b in batches}
    thr = load.get("throughput_inputs_per_s") or 0.0
    return {"concurrency": load_spec.concurrency, "duration_s": load_spec.duration_s,
            "http": {k: load[k] for k in ("throughput_inputs_per_s", "latency_ms",
                                          "mean_batch_size", "errors") if k in load},
            "http_8_inputs_per_request": {k: load8[k] for k in (
                "throughput_inputs_per_s", "latency_ms", "mean_batch_size", "errors")
                if k in load8},
            "offline_inputs_per_s": offline, "mean_batch": mean_batch,
            "http_over_offline_at_mean_batch": thr / offline[str(mean_batch)],
            "http_over_offline_at_concurrency_batch": thr / offline[
                str(load_spec.concurrency)]}


def _png_images(payload: Path | None, count: int) -> list[str]:
    import numpy as np
    from PIL import Image

    if payload is not None:
        with np.load(payload / "data" / "fmnist_test.npz") as npz:
            arrays = list(npz["images"][:count])
    else:
        arrays = common.fashion_mnist_images(count)[0]
    out = []
    for arr in arrays:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out
