"""bench.scale's analysis and plot: is resolve O(k), what "*" asks of the device cache, the
targets, and the six-panel figure.

O(k) is judged per k as the median resolve latency at the largest registry size over that at
the smallest (``O_K_THRESHOLD``); a log-log slope in k at the largest size is reported too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench import common
from bench.scale_workload import Plan, fetch_defaults

O_K_THRESHOLD = 2.0  # latency at the largest registry / at the smallest, per k


# -- analysis ----------------------------------------------------------------------------------
def o_k_check(resolve: list[dict[str, Any]]) -> dict[str, Any]:
    """Per k: median latency at each registry size, and largest-size / smallest-size."""
    out: dict[str, Any] = {}
    for k in sorted({r["k"] for r in resolve}):
        rows = sorted((r["registry_size"], r["median_ms"]) for r in resolve if r["k"] == k)
        out[str(k)] = {"sizes": [n for n, _ in rows], "median_ms": [ms for _, ms in rows],
                       "largest_over_smallest": rows[-1][1] / rows[0][1] if len(rows) > 1
                       else None, "size_ratio": rows[-1][0] / rows[0][0]}
    at_largest = [r for r in resolve
                  if r["registry_size"] == max(x["registry_size"] for x in resolve)]
    if len(at_largest) > 1:
        fit = common.linear_fit([math.log(r["k"]) for r in at_largest],
                                [math.log(r["median_ms"]) for r in at_largest])
        out["loglog_slope_in_k_at_largest_size"] = fit["slope"]
    return out


def device_cache(star: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """What ``"*"`` over the active components asks of the device cache (``TMC_CACHE_BYTES``:
    half for component Δ's, half for composed Δ's), and the same for large components."""
    budget = fetch_defaults()["cache_bytes"]
    half = budget // 2
    active, per_large = star["active"], large["delta_bytes"]
    compose_per_large_s = large["compose"]["median_ms"] / 1e3 / large["components"]
    stage_per_large_s = large["load_cold"]["median_ms"] / 1e3
    return {
        "cache_bytes_default": budget, "component_budget": half, "composed_budget": half,
        "small": {"component_delta_bytes": star["component_delta_bytes"],
                  "fits_component_budget": star["component_delta_bytes"] <= half,
                  "composed_delta_bytes": star["composed_delta_bytes"]},
        "large_if_all_active": {
            "active": active, "component_delta_bytes": active * per_large,
            "components_that_fit": half // per_large,
            "composed_delta_bytes": large["composed_delta_bytes"],
            "estimated_recompose_s": active * compose_per_large_s,
            "estimated_cold_stage_s_sequential": active * stage_per_large_s,
            "note": "each generation change that touches the active set builds a new "
                    "composed Δ: with component Δ's beyond the budget, every one is staged "
                    "from storage again and summed (estimates: per-component medians × "
                    "active)"},
    }


def targets(setups: dict[str, dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """O(k): for the largest k measured at every registry size (100 in the full run), the
    resolve latency at the largest size over that at the smallest (100× more components in
    the full run) stays below O_K_THRESHOLD; O(registry size) would scale with the sizes."""
    k = max(k for k in plan.ks if k <= min(plan.sizes))
    out = {}
    for name, res in setups.items():
        check = res["o_k"].get(str(k), {})
        out[f"resolve is O(k), {name}"] = common.target(
            check.get("largest_over_smallest"), O_K_THRESHOLD, "<=",
            f"k={k}: median resolve latency at registry size {max(plan.sizes)} / at "
            f"{min(plan.sizes)}")
    return out


# -- plot --------------------------------------------------------------------------------------
STYLE = {"redis+s3": {"color": "tab:red"}, "sqlite+files": {"color": "tab:blue"}}


def _plot_adds(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        c = STYLE[name]["color"]
        rows = res["add_small"]
        ax.plot([r["count"] for r in rows], [r["median_ms"] for r in rows], "-", color=c,
                label=f"{name} small, median")
        ax.plot([r["count"] for r in rows], [r["p90_ms"] for r in rows], ":", color=c,
                label=f"{name} small, p90")
        big = res["add_large"]
        ax.plot([r["count"] for r in big], [r["median_ms"] for r in big], "s", color=c,
                label=f"{name} 8 MiB, median")
    ax.set(xlabel="components in the registry", ylabel="add latency (ms)", yscale="log",
           title="1. add, per batch")


def _plot_resolve_k(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        sizes = sorted({r["registry_size"] for r in res["resolve"]})
        for j, n in enumerate(sizes):
            rows = sorted((r["k"], r["median_ms"]) for r in res["resolve"]
                          if r["registry_size"] == n)
            ax.plot(*zip(*rows, strict=True), "o-", color=STYLE[name]["color"],
                    alpha=0.35 + 0.65 * j / max(1, len(sizes) - 1),
                    label=f"{name}, N={n}" if j in (0, len(sizes) - 1) else None)
    ax.set(xlabel="k (components in the composition)", ylabel="resolve latency (ms)",
           xscale="log", yscale="log", title="2. resolve vs k (N = registry size)")


def _plot_resolve_n(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        ks = sorted({r["k"] for r in res["resolve"]})
        for j, k in enumerate(ks):
            rows = sorted((r["registry_size"], r["median_ms"]) for r in res["resolve"]
                          if r["k"] == k)
            ax.plot(*zip(*rows, strict=True), "o-", color=STYLE[name]["color"],
                    alpha=0.35 + 0.65 * j / max(1, len(ks) - 1), label=f"{name}, k={k}")
    ax.set(xlabel="registry size N", ylabel="resolve latency (ms)", xscale="log",
           yscale="log", title="2. resolve vs registry size (flat = O(k))")


def _plot_forget(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    marks = {"aof": "o-", "none": "o--", "sqlite-wal": "o-"}
    words = {"aof": "AOF rewrite", "none": "AOF off", "sqlite-wal": "WAL"}
    for name, res in setups.items():
        for persistence in ("aof", "none", "sqlite-wal"):
            rows = [r for r in res["forget"]
                    if r["kind"] == "small" and r["persistence"] == persistence]
            if rows:
                ax.plot([r["registry_size"] for r in rows], [r["median_ms"] for r in rows],
                        marks[persistence], color=STYLE[name]["color"],
                        label=f"{name} ({words[persistence]})")
        big = [r for r in res["forget"] if r["kind"] == "large"]
        ax.plot([r["registry_size"] for r in big], [r["median_ms"] for r in big], "s",
                color=STYLE[name]["color"], label=f"{name} 8 MiB")
    ax.set(xlabel="registry size N", ylabel="forget latency (ms, median)", xscale="log",
           yscale="log", title="3. forget")


def _plot_star(ax: Any, setups: dict[str, dict[str, Any]]) -> None:
    for name, res in setups.items():
        rows = res["star"]
        ax.plot([r["registry_size"] for r in rows], [r["median_ms"] for r in rows], "o-",
                color=STYLE[name]["color"], label=f"{name} (active = N/{res['active_every']})")
    ax.set(xlabel="registry size N", ylabel='resolve "*" (ms)', xscale="log", yscale="log",
           title='5. "*" reads every head')


def _plot_memory(ax: Any, memory: dict[str, Any]) -> None:
    """Bars: MEMORY USAGE summed over the keys, per component; text: used_memory growth."""
    cases = [(where, size) for size in ("per_small", "per_large")
             for where in ("bytes_in_s3", "bytes_in_redis")]
    keys = [memory[w][sz]["key_bytes"] for w, sz in cases]
    used = [memory[w][sz]["used_memory"] for w, sz in cases]
    ax.bar(range(4), keys, color=["tab:red", "tab:gray"] * 2)
    ax.set_xticks(range(4), ["small, bytes in S3", "small, bytes in Redis",
                             "8 MiB, bytes in S3", "8 MiB, bytes in Redis"],
                  rotation=20, fontsize=7)
    for i, (kb, ub) in enumerate(zip(keys, used, strict=True)):
        ax.text(i, kb, f"keys {kb / 1024:,.1f} KiB\nused_memory {ub / 1024:,.1f} KiB",
                ha="center", va="bottom", fontsize=6)
    ax.set(ylabel="Redis bytes per component (MEMORY USAGE)", yscale="log",
           ylim=(100, max(keys) * 20), title="4. Redis memory per component")


def draw(png: Path, results: dict[str, Any], quick: bool) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    setups = results["setups"]
    _plot_adds(axes[0][0], setups)
    _plot_resolve_k(axes[0][1], setups)
    _plot_resolve_n(axes[0][2], setups)
    _plot_forget(axes[1][0], setups)
    _plot_star(axes[1][1], setups)
    _plot_memory(axes[1][2], results["redis_memory"])
    for ax in axes.flat[:5]:
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Registry at scale: Redis index + S3 bytes vs SQLite + files"
                 + (" (quick run)" if quick else ""))
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
