"""The "Registry at scale" section of SUMMARY.md, from bench.scale's file: add, resolve,
forget and "*" latency per setup, Redis memory per component, and how to read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.summary_format import Doc, num, table


def _ms(row: Any) -> str:
    """'median (p90)' ms of a bench.scale latency row."""
    if not isinstance(row, dict) or row.get("median_ms") is None:
        return "–"
    return f"{num(row['median_ms'])} ({num(row.get('p90_ms'))})"


def _scale_adds(setups: Doc) -> str:
    rows = []
    for name, res in setups.items():
        small, large = res["add_small"], res["add_large"]
        rows.append([name, f"{small[0]['count']}: {_ms(small[0])}",
                     f"{small[-1]['count']}: {_ms(small[-1])}",
                     f"{large[-1]['count']}: {_ms(large[-1])}"])
    return table(["setup", "small, first batch", "small, last batch", "large, last batch"],
                 rows)


def _scale_resolve(setups: Doc) -> str:
    ks = sorted({r["k"] for res in setups.values() for r in res["resolve"]})
    rows = []
    for name, res in setups.items():
        for n in sorted({r["registry_size"] for r in res["resolve"]}):
            cells = {r["k"]: _ms(r) for r in res["resolve"] if r["registry_size"] == n}
            rows.append([name, n, *(cells.get(k, "–") for k in ks)])
    ratios = "; ".join(
        f"{name}: " + ", ".join(f"k={k} {num(v['largest_over_smallest'], 2)}×"
                                for k, v in res["o_k"].items()
                                if isinstance(v, dict) and v.get("largest_over_smallest"))
        for name, res in setups.items())
    return (table(["setup", "registry size", *(f"k={k}" for k in ks)], rows)
            + f"\n\nLatency at the largest registry size / at the smallest, per k: {ratios}.")


def _scale_forget(setups: Doc) -> str:
    rows = [[name, r["kind"], r["persistence"], r["registry_size"], _ms(r)]
            for name, res in setups.items() for r in res["forget"]]
    return table(["setup", "component", "persistence", "registry size", "forget ms"], rows)


def _scale_star(setups: Doc) -> str:
    rows = []
    for name, res in setups.items():
        star, cache = res["star_cost"], res["device_cache"]
        rows.append([name, ", ".join(f"{r['registry_size']}: {num(r['median_ms'])}"
                                     for r in res["star"]), star["active"],
                     num(star["stage_cold_s"]), num(star["stage_warm_s"]),
                     _ms(star["compose"]), num(star["component_delta_bytes"] / 2**20),
                     num(cache["large_if_all_active"]["component_delta_bytes"] / 2**30)])
    first = next(iter(setups.values()))
    return (table(['setup', '"*" resolve ms by registry size', "active",
                   "stage cold s", "stage warm s", "compose ms", "Δ_k MiB",
                   "if 8 MiB each: GiB"], rows)
            + f"\n\nWith the service's default fetch pool: {first['star_cost']['default_pool']}"
            f" Device cache budget (default TMC_CACHE_BYTES): "
            f"{num(first['device_cache']['component_budget'] / 2**20)} MiB for component Δ's.")


def _scale_memory(memory: Doc) -> str:
    rows = []
    for where in ("bytes_in_s3", "bytes_in_redis"):
        m = memory[where]
        for size in ("small", "large"):
            per = m[f"per_{size}"]
            rows.append([where.replace("_", " "), size, m[size], num(per["used_memory"]),
                         num(per["key_bytes"])])
    return table(["Redis", "component", "count", "used_memory B/component",
                  "MEMORY USAGE B/component"], rows)


def _scale_reading(setups: Doc) -> str:
    """The curves in words, from the figures (no number typed in by hand)."""
    lines = []
    for name, res in setups.items():
        star = res["star"]
        forgets = {r["persistence"]: r for r in res["forget"]
                   if r["kind"] == "small" and r["registry_size"] == star[-1]["registry_size"]}
        growth = star[-1]["registry_size"] / star[0]["registry_size"]
        line = (f"- {name}: registry {num(growth)}× larger → explicit resolve at k=100 "
                f"{num(res['o_k'].get('100', {}).get('largest_over_smallest'), 2)}× (O(k)), "
                f'"*" {num(star[-1]["median_ms"] / star[0]["median_ms"], 2)}× (reads every '
                "head: O(registry size))")
        if "aof" in forgets and "none" in forgets:
            line += (f"; forget at {star[-1]['registry_size']} components "
                     f"{num(forgets['aof']['median_ms'])} ms with the AOF rewrite it waits for, "
                     f"{num(forgets['none']['median_ms'])} ms without")
        lines.append(line + ".")
    cache = next(iter(setups.values()))["device_cache"]["large_if_all_active"]
    lines.append(f"- \"*\" over {cache['active']} components of 8 MiB would need "
                 f"{num(cache['component_delta_bytes'] / 2**30)} GiB of component Δ's; the "
                 f"default component cache holds {cache['components_that_fit']}: every change "
                 "of the active set re-stages them all from storage.")
    return "\n".join(lines)


def scale_section(doc: Doc, path: Path) -> str:
    """bench.scale: the registry at 10,000 small + 200 large components, two setups."""
    res, st = doc["results"], doc["settings"]
    setups = res["setups"]
    versions = ", ".join(f"{k} {v}" for k, v in st.get("versions", {}).items())
    return "\n\n".join([
        f"Small components {num(st['small_component_bytes'])} B, large "
        f"{num(st['large_component_bytes'] / 2**20)} MiB; Redis: {st['redis']}; S3: {st['s3']}."
        f" Versions: {versions}.",
        "Add latency, median (p90) ms per batch:", _scale_adds(setups),
        "Resolve an explicit composition of k components, median (p90) ms:",
        _scale_resolve(setups),
        "Forget, median (p90) ms (Redis: with the AOF rewrite the forget waits for, and with "
        "the AOF off):", _scale_forget(setups),
        '"*" (`resolve_all_active`) and the composition of every active component:',
        _scale_star(setups),
        "Redis memory per component (INFO used_memory growth / count, and MEMORY USAGE "
        "summed over the keys):", _scale_memory(res["redis_memory"]),
        "Reading:", _scale_reading(setups)])
