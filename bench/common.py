"""Shared benchmark helpers: machine description, statistics, interleaved timing, result
files. (Starting and reading processes: bench.processes; a server's /metrics: bench.scrape.)

Statistics come from the standard library: medians and percentiles from ``statistics``
(percentiles by ``statistics.quantiles(method="inclusive")``), straight-line fits from
``statistics.linear_regression``.

Every benchmark writes ``bench/results/<name>.json`` (``<name>_quick.json`` for ``--quick``)
with the same top-level shape::

    {"name", "quick", "machine": {...}, "settings": {...}, "results": {...},
     "targets": {"<target>": {"value": x, "threshold": y, "met": bool, "note": "..."}}}

Timing on a shared machine is noisy, so cases are measured in interleaved rounds (every
case once per round, in a shuffled order): slow drifts in background load hit every case
alike, and ratios between cases are taken from the same rounds. Figures are medians with
min and max over the rounds.

Import this module before torch: it sets ``OMP_WAIT_POLICY=PASSIVE`` (spinning OpenMP
workers collapse throughput when other processes compete for the cores).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime as _dt
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


# -- machine -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on, including the load other processes put on it."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": list(os.getloadavg()),
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- statistics --------------------------------------------------------------------------------
def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and count of a list of samples (any unit)."""
    xs = [float(x) for x in samples]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def scale(stats: dict[str, Any], factor: float) -> dict[str, Any]:
    """The same summary in another unit (factor > 0 keeps min/max in place)."""
    out = dict(stats)
    for key in ("median", "min", "max"):
        if out.get(key) is not None:
            out[key] = out[key] * factor
    return out


def per_second(stats: dict[str, Any], items: float) -> dict[str, Any]:
    """Seconds per call -> items per second (min and max swap)."""
    def inv(v: float | None) -> float | None:
        return None if not v else items / v
    return {"median": inv(stats["median"]), "min": inv(stats["max"]),
            "max": inv(stats["min"]), "n": stats["n"]}


def ratio_samples(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """num/den per round (the rounds are interleaved, so each pair saw the same load)."""
    pairs = [a / b for a, b in zip(num, den, strict=False) if b]
    return summarize(pairs)


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least squares y = a + b·x (statistics.linear_regression), with R² (the squared
    Pearson correlation, which is R² for a straight line with an intercept). Constant x:
    a flat line through the mean; constant y: a perfect fit."""
    my = statistics.fmean(ys)
    if len(set(xs)) < 2:
        return {"intercept": my, "slope": 0.0, "r2": 1.0 if len(set(ys)) < 2 else 0.0}
    fit = statistics.linear_regression(xs, ys)
    r2 = statistics.correlation(xs, ys) ** 2 if len(set(ys)) > 1 else 1.0
    return {"intercept": fit.intercept, "slope": fit.slope, "r2": r2}


def ms(seconds: float | None) -> float | None:
    """Seconds -> milliseconds, None kept."""
    return None if seconds is None else seconds * 1e3


def percentile(samples: Sequence[float], q: int) -> float | None:
    """The q-th percentile (1 ≤ q ≤ 99) of the samples, None for none.

    statistics.quantiles with method="inclusive": the samples are the whole population (min
    and max are the 0th and 100th percentiles, nothing is extrapolated past them), the
    definition bench.scale's p90 has always used and numpy's default; p50 is the median.
    """
    xs = [float(x) for x in samples]
    if len(xs) < 2:
        return xs[0] if xs else None
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


# -- timing ------------------------------------------------------------------------------------
@dataclass
class Case:
    """One thing to time. ``setup`` runs untimed before each call (e.g. clear a cache).

    Each sample records wall-clock seconds and this process's CPU seconds (all threads) per
    call: on a machine shared with other jobs, wall time includes waiting for a core, CPU
    time mostly does not, so CPU-time ratios are the steadier measure of compute cost.
    """

    key: str
    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    inner: int = 0  # calls averaged per sample; 0 = calibrate from the warm-up call
    group: str = ""  # cases of one group get the same inner count (compare like with like)
    samples: list[float] = field(default_factory=list)  # wall seconds per call
    cpu: list[float] = field(default_factory=list)  # process CPU seconds per call

    def once(self) -> tuple[float, float]:
        if self.setup is not None:
            self.setup()
        wall, cpu = time.perf_counter(), time.process_time()
        self.fn()
        return time.perf_counter() - wall, time.process_time() - cpu

    def sample(self) -> None:
        pairs = [self.once() for _ in range(self.inner)]
        self.samples.append(sum(w for w, _ in pairs) / self.inner)
        self.cpu.append(sum(c for _, c in pairs) / self.inner)


class Timings(dict[str, list[float]]):
    """key -> wall seconds per call, one entry per round (a plain dict of the wall times,
    as callers index it), plus ``.cpu``: key -> process CPU seconds per call."""

    def __init__(self, wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
        super().__init__(wall)
        self.cpu = cpu

    @property
    def wall(self) -> dict[str, list[float]]:
        return dict(self)


def run_rounds(cases: Sequence[Case], repeats: int, *, min_sample_s: float = 0.02,
               max_inner: int = 20, seed: int = 0, budget_s: float | None = None,
               progress: Callable[[str], None] | None = None) -> Timings:
    """Time every case ``repeats`` times in interleaved, shuffled rounds.

    Each case is warmed up (twice when a call is cheap); cheap cases average ``inner`` calls
    per sample so one sample takes at least ``min_sample_s`` — the same count for every case
    of a group (set by its slowest member), since the first call after another case runs
    with colder caches than the following ones. ``budget_s`` stops after the round that
    crosses it (at least 2 rounds). Calling it again on the same cases appends.
    """
    slowest: dict[str, float] = {}
    for case in cases:
        warm, _ = case.once()
        if warm < 0.2:
            warm, _ = case.once()
        key = case.group or case.key
        slowest[key] = max(slowest.get(key, 0.0), warm)
    for case in cases:
        if case.inner <= 0:
            warm = slowest[case.group or case.key]
            case.inner = max(1, min(max_inner, math.ceil(min_sample_s / max(warm, 1e-6))))
    rng = random.Random(seed)
    order = list(cases)
    started = time.perf_counter()
    for r in range(repeats):
        rng.shuffle(order)
        for case in order:
            case.sample()
        elapsed = time.perf_counter() - started
        if progress:
            progress(f"round {r + 1}/{repeats} done ({elapsed:.0f} s)")
        if budget_s is not None and r >= 1 and elapsed > budget_s:
            if progress:
                progress(f"time budget {budget_s:.0f} s reached after {r + 1} rounds")
            break
    return Timings({c.key: list(c.samples) for c in cases}, {c.key: list(c.cpu) for c in cases})


# -- output ------------------------------------------------------------------------------------
def target(value: float | None, threshold: float, op: str, note: str = "") -> dict[str, Any]:
    """A target entry; op is '<=' or '>='. A missing value is not met."""
    met = value is not None and (value <= threshold if op == "<=" else value >= threshold)
    return {"value": value, "threshold": threshold, "op": op, "met": bool(met), "note": note}


def result_stem(name: str, quick: bool) -> str:
    return f"{name}_quick" if quick else name


def write_result(name: str, quick: bool, machine_info: dict[str, Any], settings: dict[str, Any],
                 results: dict[str, Any], targets: dict[str, Any], started: float, *,
                 out_dir: Path = RESULTS, stem: str = "") -> Path:
    """``<out_dir>/<stem>.json`` (default: bench/results/<result_stem>.json), written whole
    or not at all."""
    machine_info = {**machine_info, "load_average_at_end": list(os.getloadavg())}
    doc = {"name": name, "quick": quick,
           "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
           "wall_seconds": time.perf_counter() - started,
           "machine": machine_info, "settings": settings, "results": results,
           "targets": targets}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem or result_stem(name, quick)}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def finish(name: str, quick: bool, machine_info: dict[str, Any], settings: dict[str, Any],
           results: dict[str, Any], targets: dict[str, Any], started: float,
           draw: Callable[[Path], None] | None = None, *, out_dir: Path = RESULTS,
           stem: str = "") -> Path:
    """Write the result file, draw its plot (``draw(png path)``, the png beside the json),
    log every target."""
    path = write_result(name, quick, machine_info, settings, results, targets, started,
                        out_dir=out_dir, stem=stem)
    if draw is not None:
        draw(path.with_suffix(".png"))
    for tname, t in targets.items():
        value = f"{t['value']:.3g}" if isinstance(t["value"], float) else t["value"]
        log(f"{'MET ' if t['met'] else 'MISS'} {tname}: {value} ({t['note']})")
    log(f"wrote {path}")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def png_path(name: str, quick: bool) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{result_stem(name, quick)}.png"


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- images ------------------------------------------------------------------------------------
def fashion_mnist_images(count: int, seed: int = 0) -> tuple[list[Any], str]:
    """`count` 28×28 uint8 grey images (numpy) from the Debian dataset, else random ones."""
    import gzip

    import numpy as np

    path = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    if path.is_file():
        with gzip.open(path, "rb") as f:
            data = f.read(16 + count * 784)
        arr = np.frombuffer(data[16:], dtype=np.uint8).reshape(-1, 28, 28)
        if len(arr) >= count:
            return [a.copy() for a in arr[:count]], str(path)
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(count)], "random"


def png_base64(image: Any) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # uint8 [H, W] -> grey
    return base64.b64encode(buf.getvalue()).decode()
