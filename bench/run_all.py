"""Run every benchmark, then write bench/results/SUMMARY.md (`make bench`, `make bench-quick`).

    python -m bench.run_all [--quick] [--only cost,serving] [--skip accuracy]

'accuracy' in --only/--skip names every accuracy-<experiment> step.

Order: the timing benchmarks one at a time, then BBC alone on every core, then the three
Fashion-MNIST accuracy experiments side by side on one thread each (--jobs; ~54 min in all on
2 cores from an empty cache on 2026-11-27, before bench.scale and the digits/BBC class-IL
experiments were added: now roughly 1.5–2 h, not re-timed end to end).

Each benchmark runs as its own subprocess (its own process group) with a time limit; one
that is missing (module or flag not there yet), fails or runs out of time is reported and
the run goes on. The statuses go to bench/results/run_all[_quick].json and into the summary.
Exit status: 0 when every benchmark that exists succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ("--quick",)
    limit_s: float = 900.0
    quick_limit_s: float = 300.0
    needs_flags: tuple[str, ...] = ()  # flags its --help must list, else "missing"
    # may run beside other such steps (--jobs) on cores/jobs threads: no timing targets inside,
    # and op-overhead-bound enough that one thread each beats two threads in turn
    parallel_ok: bool = False


STEPS = (
    Step("overhead", "bench.overhead", limit_s=900, quick_limit_s=300),
    Step("cost", "bench.cost", limit_s=1500, quick_limit_s=420),
    Step("compose_bandwidth", "bench.compose_bandwidth", limit_s=600, quick_limit_s=180),
    Step("serving", "bench.serving", limit_s=600, quick_limit_s=300),
    Step("memory", "bench.memory", limit_s=600, quick_limit_s=300),
    # the registry at 10,000 + 200 components on Redis+S3 and SQLite+files (~6 min full)
    Step("scale", "bench.scale", limit_s=1200, quick_limit_s=300),
    # BBC's minilm tail is compute-bound (one tangent epoch: 10.3 s on 1 thread, 5.7 s on 2):
    # it runs alone on every core; the Fashion-MNIST tails (a conv head on 2×2 maps) are
    # op-overhead bound (a component trains in 9.4–11.7 s on 1 thread vs 12.9–15.5 s on 2),
    # so they run side by side on one thread each (--jobs). Longest first.
    *(Step(f"accuracy-{name}", "bench.accuracy", args=("--experiment", name),
           limit_s=limit, quick_limit_s=quick_limit, needs_flags=("--seeds",),
           parallel_ok=packed)
      for name, limit, quick_limit, packed in (("bbc-data-il", 2400, 480, False),
                                               ("bbc-class-il", 3000, 600, False),
                                               ("fmnist-class-il", 1200, 300, True),
                                               ("fmnist-data-il", 1200, 300, True),
                                               ("fmnist-data-il-10", 1200, 300, True),
                                               ("digits-class-il", 600, 300, True))),
)


@dataclass
class Outcome:
    name: str
    status: str  # ok | failed | timeout | missing
    command: list[str]
    seconds: float = 0.0
    returncode: int | None = None
    detail: str = ""
    tail: list[str] = field(default_factory=list)


def missing_reason(step: Step) -> str | None:
    try:
        found = importlib.util.find_spec(step.module) is not None
    except ImportError:
        found = False
    if not found:
        return f"module {step.module} does not exist"
    if step.needs_flags:
        help_text = subprocess.run([sys.executable, "-m", step.module, "--help"], cwd=REPO,
                                   capture_output=True, text=True, timeout=300)
        absent = [f for f in step.needs_flags if f not in help_text.stdout + help_text.stderr]
        if absent:
            return f"{step.module} has no {', '.join(absent)} flag"
    return None


def run_step(step: Step, quick: bool, threads: int | None = None) -> Outcome:
    command = [sys.executable, "-m", step.module, *step.args,
               *(step.quick_args if quick else ())]
    reason = missing_reason(step)
    if reason:
        print(f"== {step.name}: MISSING ({reason})", flush=True)
        return Outcome(step.name, "missing", command, detail=reason)
    limit = step.quick_limit_s if quick else step.limit_s
    print(f"== {step.name}: {' '.join(command[1:])} (limit {limit:.0f} s)", flush=True)
    started = time.perf_counter()
    env = dict(os.environ)
    if threads is not None:  # one process per core beats one process on every core here
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail: deque[str] = deque(maxlen=40)
    reader = threading.Thread(target=_pump, args=(proc, step.name, tail), daemon=True)
    reader.start()
    try:
        rc: int | None = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        rc, status = None, "timeout"
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    print(f"== {step.name}: {status.upper()} after {seconds:.0f} s", flush=True)
    detail = f"over the {limit:.0f} s limit" if status == "timeout" else (
        f"exit status {rc}" if status == "failed" else "")
    return Outcome(step.name, status, command, seconds, rc, detail,
                   list(tail) if status != "ok" else [])


def _pump(proc: subprocess.Popen[str], name: str, tail: deque[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        print(f"[{name}] {line}", end="", flush=True)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the benchmark's own process group (it and the servers it started), then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _merge(path: Path, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    try:
        old = json.loads(path.read_text()).get("steps", [])
    except (OSError, ValueError, AttributeError):
        return steps
    new = {s["name"]: s for s in steps}
    merged = [new.pop(s["name"], s) for s in old if isinstance(s, dict) and "name" in s]
    return merged + list(new.values())


def run_steps(steps: list[Step], quick: bool, jobs: int) -> list[Outcome]:
    """Timing steps one by one; then the parallel_ok steps ``jobs`` at a time, each with
    cores // jobs torch threads (jobs 1: all of them in turn, torch's own thread count)."""
    from concurrent.futures import ThreadPoolExecutor

    serial = [s for s in steps if not (jobs > 1 and s.parallel_ok)]
    outcomes = {s.name: run_step(s, quick) for s in serial}
    rest = [s for s in steps if s.name not in outcomes]
    if rest:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for s, o in zip(rest, pool.map(lambda st: run_step(st, quick, threads), rest),
                            strict=True):
                outcomes[s.name] = o
    return [outcomes[s.name] for s in steps]


def picked(name: str, tokens: set[str]) -> bool:
    """'accuracy' names every accuracy-* step; a full name names one."""
    return any(name == t or name.startswith(t + "-") for t in tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--skip", help="comma-separated benchmark names")
    ap.add_argument("--jobs", type=int, default=3,
                    help="run the Fashion-MNIST accuracy experiments this many at a time, each "
                         "with max(1, cores/jobs) torch threads (default 3: all three at once, "
                         "one thread each on 2 cores; 1: every step alone, in turn). Timing "
                         "benchmarks and BBC always run alone, first")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    chosen = [s for s in STEPS
              if (only is None or picked(s.name, only)) and not picked(s.name, skip)]
    started = time.perf_counter()
    outcomes = run_steps(chosen, args.quick, args.jobs)
    elapsed = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("run_all_quick.json" if args.quick else "run_all.json")
    steps = [o.__dict__ for o in outcomes]
    if only is not None or skip:  # a partial run updates the last full record's steps
        steps = _merge(path, steps)
    record: dict[str, Any] = {
        "name": "run_all", "quick": args.quick,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": sum(float(s.get("seconds") or 0.0) for s in steps),  # steps summed
        "last_invocation": {"elapsed_seconds": elapsed, "jobs": args.jobs,
                            "steps": [o.name for o in outcomes]},
        "steps": steps}
    path.write_text(json.dumps(record, indent=1) + "\n")
    from bench import summary

    path = summary.write_summary()
    print(f"== summary: {path}", flush=True)
    for o in outcomes:
        print(f"   {o.name:17s} {o.status:8s} {o.seconds:6.0f} s  {o.detail}", flush=True)
    return 0 if all(o.status in ("ok", "missing") for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
