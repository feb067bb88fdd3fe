"""Registry latency for one 30 MB float32 component, on both backends.

    python -m bench.registry_latency [--repeats N] [--mb 30]

Per repeat: a fresh component (new bytes) is added, resolved, loaded twice (cold: from the
blob store; warm: again, from the local cache in Redis mode, the blob file in embedded
mode), then forgotten. Medians (and min/max) in milliseconds; the embedded backend uses a
temporary folder, the Redis one a redis-server this script starts on a free loopback port.
Results: bench/results/registry_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch

from registry import Registry, open_registry
from tangent import TangentParam, encode_component

RESULTS = Path(__file__).resolve().parent / "results"
FP = "b" * 64
STEPS = ("add", "resolve", "load_cold", "load_warm", "forget")


def _region(mb: float) -> dict[str, TangentParam]:
    n = int(mb * 1024 * 1024 / 4)
    return {"head.weight": TangentParam("head.weight", (n,), "float32")}


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", workdir, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait(url)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _wait(url: str) -> None:
    for _ in range(200):
        with redis.Redis.from_url(url) as client:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
    raise RuntimeError("redis-server did not answer")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1000, result


def _one_round(reg: Registry, data: bytes, cid: str) -> dict[str, float]:
    ms: dict[str, float] = {}
    ms["add"], added = _timed(lambda: reg.add(cid, data))
    ms["resolve"], _ = _timed(lambda: reg.resolve_explicit({cid: 1.0}))
    ms["load_cold"], _ = _timed(lambda: reg.load_tensors(added.digest))
    ms["load_warm"], _ = _timed(lambda: reg.load_tensors(added.digest))
    ms["forget"], _ = _timed(lambda: reg.forget(cid))
    return ms


def measure(reg: Registry, region: dict[str, TangentParam], repeats: int) -> dict[str, Any]:
    (param,) = region.values()
    base = torch.randn(param.shape, generator=torch.Generator().manual_seed(0))
    rounds = []
    for i in range(repeats):
        base[0] = float(i)  # new bytes each round: a new version, not an idempotent re-add
        data = encode_component({param.name: base}, FP, {"round": i})
        rounds.append(_one_round(reg, data, f"bench-{i}"))
    return {"nbytes": len(data), "repeats": repeats,
            "median_ms": {s: statistics.median(r[s] for r in rounds) for s in STEPS},
            "min_ms": {s: min(r[s] for r in rounds) for s in STEPS},
            "max_ms": {s: max(r[s] for r in rounds) for s in STEPS}}


def run(mb: float, repeats: int) -> dict[str, Any]:
    region = _region(mb)
    limit = int(mb * 1024 * 1024) + 1024 * 1024
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open_registry(registry_dir=Path(tmp) / "reg", redis_url=None, base_fingerprint=FP,
                           region=region, max_component_bytes=limit) as reg:
            results["sqlite"] = measure(reg, region, repeats)
        with redis_server() as url, open_registry(
                registry_dir=None, redis_url=url, base_fingerprint=FP, region=region,
                max_component_bytes=limit, cache_dir=Path(tmp) / "cache") as reg:
            results["redis"] = measure(reg, region, repeats)
    return results


def _table(results: dict[str, Any]) -> str:
    lines = ["backend | " + " | ".join(f"{s} ms" for s in STEPS),
             " | ".join(["---"] * (len(STEPS) + 1))]
    for backend, r in results.items():
        lines.append(backend + " | " + " | ".join(f"{r['median_ms'][s]:.1f}" for s in STEPS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mb", type=float, default=30.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = run(args.mb, args.repeats)
    report = {"component_mb": args.mb, "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "python": platform.python_version(), "redis": _redis_version(),
              "backends": results, "table": _table(results)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "registry_latency.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"registry latency, one {results['sqlite']['nbytes'] / 1e6:.1f} MB component, "
          f"median of {args.repeats} (ms):")
    print(_table(results))


def _redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return out.stdout.strip()


if __name__ == "__main__":
    main()
