"""bench.cost's analysis and plot: per method and N the latency and throughput (measured or
extrapolated, and marked so), cost ratios per round against (a), the pieces (trunk, tails,
JVP), where (c') meets (a), the bandwidth of Σ w_k Δ_k, and the targets.

Ratios are taken per round (the rounds are interleaved, so both sides saw the same load) and
in process CPU time too, which waiting for a busy core does not inflate.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench import common
from bench.cost_config import BATCHES, C_PRIME, METHOD_LABELS, METHODS, PresetConfig


# -- analysis ----------------------------------------------------------------------------------
def method_series(samples: dict[str, list[float]], cfg: PresetConfig, method: str, n: int,
                  batch: int) -> tuple[list[float], bool]:
    """Per-round seconds of one method at N (measured, or extrapolated from the cap)."""
    key = f"{method}|{n}|{batch}"
    if key in samples:
        return samples[key], False
    if method in ("c", "d"):
        cap = cfg.cap_full
        return [t * n / cap for t in samples[f"{method}|{cap}|{batch}"]], True
    cap = cfg.cap_tails
    at_cap, tail = samples[f"c'|{cap}|{batch}"], samples[f"tail_plain|{batch}"]
    return [t + (n - cap) * s for t, s in zip(at_cap, tail, strict=False)], True


def analyse(timings: common.Timings, cfg: PresetConfig, delta_bytes: int) -> dict[str, Any]:
    """Wall-clock figures (latency, throughput, ratios) plus the same ratios in CPU time;
    ``delta_bytes``: one component's Δ, for the bandwidth of Σ w_k Δ_k."""
    out = analyse_clock(timings.wall, cfg)
    cpu = analyse_clock(timings.cpu, cfg)
    for method, info in out["methods"].items():
        for point, cpu_point in zip(info["points"], cpu["methods"][method]["points"],
                                    strict=True):
            point["cpu_ms_per_call"] = cpu_point["ms_per_call"]
    out["ratios_cpu"] = cpu["ratios"]
    out["breakdown_cpu"] = cpu["breakdown"]
    out["a_flatness_cpu"] = cpu["a_flatness"]
    out["compose"] = compose_analysis(timings.wall, cfg, delta_bytes)
    return out


def analyse_clock(samples: dict[str, list[float]], cfg: PresetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"methods": {}, "ratios": {}, "breakdown": {}}
    series: dict[tuple[str, int, int], list[float]] = {}
    for method in METHODS:
        rows = []
        for batch in BATCHES:
            for n in cfg.ns:
                xs, extrapolated = method_series(samples, cfg, method, n, batch)
                series[(method, n, batch)] = xs
                stats = common.summarize(xs)
                rows.append({"n": n, "batch": batch, "extrapolated": extrapolated,
                             "ms_per_call": common.scale(stats, 1e3),
                             "ms_per_item": common.scale(stats, 1e3 / batch),
                             "items_per_s": common.per_second(stats, batch)})
        out["methods"][method] = {"label": METHOD_LABELS[method], "points": rows}
    for batch in BATCHES:
        for n in cfg.ns:
            a = series[("a", n, batch)]
            out["ratios"][f"{n}|{batch}"] = {
                other: common.ratio_samples(series[(other, n, batch)], a)
                for other in ("b", "c", "c'", "d")}
        out["breakdown"][str(batch)] = {
            piece: common.scale(common.summarize(samples[f"{piece}|{batch}"]), 1e3)
            for piece in ("trunk", "tail_plain", "tail_jvp", "full_plain", "full_jvp_naive")}
        out["breakdown"][str(batch)]["jvp_tail_over_plain_tail"] = common.ratio_samples(
            samples[f"tail_jvp|{batch}"], samples[f"tail_plain|{batch}"])
        out["breakdown"][str(batch)]["crossover_n_vs_c_prime"] = crossover(series, cfg, batch)
    out["a_flatness"] = {str(b): common.ratio_samples(series[("a", cfg.ns[-1], b)],
                                                      series[("a", cfg.ns[0], b)])
                         for b in BATCHES}
    return out


def crossover(series: dict[tuple[str, int, int], list[float]], cfg: PresetConfig,
              batch: int) -> float | None:
    """N at which (c') costs as much as (a): a line through (c')'s measured medians."""
    ns = [n for n in cfg.ns if n <= cfg.cap_tails]
    if len(ns) < 2:
        return None
    fit = common.linear_fit(ns, [statistics.median(series[("c'", n, batch)]) for n in ns])
    a = statistics.median([t for n in cfg.ns for t in series[("a", n, batch)]])
    return (a - fit["intercept"]) / fit["slope"] if fit["slope"] > 0 else None


def compose_analysis(samples: dict[str, list[float]], cfg: PresetConfig, nbytes: int
                     ) -> dict[str, Any]:
    rows = []
    for n in cfg.ns:
        payload = n * nbytes
        row: dict[str, Any] = {"n": n, "bytes": payload}
        for kind in ("compose", "copy", "add_inplace"):
            xs = samples[f"{kind}|{n}"]
            row[f"{kind}_ms"] = common.scale(common.summarize(xs), 1e3)
            row[f"{kind}_gb_per_s"] = common.per_second(common.summarize(xs), payload / 1e9)
        row["compose_over_copy_bandwidth"] = common.ratio_samples(
            samples[f"copy|{n}"], samples[f"compose|{n}"])
        rows.append(row)
    fit = common.linear_fit([r["bytes"] / 1e6 for r in rows],
                            [statistics.median(samples[f"compose|{r['n']}"]) * 1e3
                             for r in rows])
    return {"delta_bytes": nbytes, "points": rows,
            "linear_fit_ms_vs_mb": fit,
            "definition": "GB/s = N·|Δ| bytes / seconds (payload, not bytes moved: a copy "
                          "reads and writes each byte once)"}


def median_of(stats: dict[str, Any]) -> float | None:
    return stats.get("median") if stats else None


def preset_targets(cfg: PresetConfig, res: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    ns = cfg.ns
    for batch in BATCHES:
        flat, flat_cpu = res["a_flatness"][str(batch)], res["a_flatness_cpu"][str(batch)]
        t[f"{cfg.key}: (a) flat N={ns[0]}→{ns[-1]}, batch {batch} (abs(ratio − 1))"] = \
            common.target(abs(flat["median"] - 1.0), 0.10, "<=",
                          f"(a) at N={ns[-1]} / (a) at N={ns[0]}, per round: "
                          f"{flat['median']:.3f} ({flat['min']:.3f}–{flat['max']:.3f}); "
                          f"in CPU time {flat_cpu['median']:.3f}")
    n5 = 5 if 5 in ns else ns[min(1, len(ns) - 1)]
    r, r_cpu = res["ratios"][f"{n5}|32"], res["ratios_cpu"][f"{n5}|32"]
    t[f"{cfg.key}: (c)/(a) at N={n5}, batch 32"] = common.target(
        median_of(r["c"]), 2.5, ">=", "paper: TMC 2.5–10× cheaper than N full models"
        + (" (c extrapolated)" if n5 > cfg.cap_full else "")
        + f"; in CPU time {median_of(r_cpu['c']):.2f}")
    t[f"{cfg.key}: (c')/(a) at N={n5}, batch 32"] = common.target(
        median_of(r["c'"]), 1.0, ">=", "TMC should beat the shared-trunk tail ensemble from "
        f"N≈4; in CPU time {median_of(r_cpu[C_PRIME]):.2f}")
    comp = res["compose"]
    t[f"{cfg.key}: (b) Σ time linear in N·|Δ| (R²)"] = common.target(
        comp["linear_fit_ms_vs_mb"]["r2"], 0.95, ">=", "least squares over N")
    last = comp["points"][-1]
    name = f"{cfg.key}: Σ bandwidth / copy bandwidth at N={last['n']} (OMP_WAIT_POLICY=PASSIVE)"
    t[name] = common.target(
        median_of(last["compose_over_copy_bandwidth"]), 0.5, ">=",
        f"compose {last['compose_gb_per_s']['median']:.2f} GB/s vs copy "
        f"{last['copy_gb_per_s']['median']:.2f} GB/s; under the service's OpenMP setting "
        "see bench/compose_bandwidth.py")
    return t


# -- plot --------------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    keys = list(results)
    fig, axes = plt.subplots(len(keys), 3, figsize=(15, 4.2 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        res = results[key]
        ax_lat, ax_thr, ax_bw = axes[row]
        for info in res["methods"].values():
            for ax, batch, field_, scale in ((ax_lat, 1, "ms_per_call", 1.0),
                                             (ax_thr, 32, "items_per_s", 1.0)):
                pts = [p for p in info["points"] if p["batch"] == batch]
                xs = [p["n"] for p in pts]
                ys = [p[field_]["median"] * scale for p in pts]
                line, = ax.plot(xs, ys, marker="o", label=info["label"])
                meas = [p for p in pts if not p["extrapolated"]]
                if len(meas) < len(pts):
                    line.set_linestyle("--")
                    ax.plot([p["n"] for p in meas], [p[field_]["median"] for p in meas],
                            marker="o", linestyle="-", color=line.get_color())
                lo = [p[field_]["min"] for p in pts]
                hi = [p[field_]["max"] for p in pts]
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        ax_lat.set(title=f"{key}: latency, batch 1", xlabel="components N", ylabel="ms",
                   xscale="log", yscale="log")
        ax_thr.set(title=f"{key}: throughput, batch 32", xlabel="components N",
                   ylabel="inputs / s", xscale="log", yscale="log")
        comp = res["compose"]["points"]
        for kind, label in (("compose", "tangent.compose + cast"), ("add_inplace",
                            "in-place add_ (reference)"), ("copy", "Tensor.copy_")):
            ax_bw.plot([p["bytes"] / 1e6 for p in comp],
                       [p[f"{kind}_gb_per_s"]["median"] for p in comp], marker="o", label=label)
        ax_bw.set(title=f"{key}: Σ w_k Δ_k bandwidth", xlabel="N·|Δ| (MB)", ylabel="GB/s",
                  xscale="log")
        ax_lat.legend(fontsize=7)
        ax_bw.legend(fontsize=7)
    fig.suptitle("TMC inference cost vs number of components (dashed: extrapolated; band: "
                 "min–max over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
