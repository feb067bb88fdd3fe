"""Build bench/results/SUMMARY.md from whatever bench/results/*.json exist.

    python -m bench.summary

One section per benchmark: where a full run's file exists it is used, else the quick run's
(marked as such). A missing or unreadable file gives a one-line note, never an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.summary_accuracy import accuracy_block, accuracy_docs
from bench.summary_format import (
    Doc,
    load,
    num,
    pick,
    png_link,
    source_line,
    span,
    table,
    targets_table,
)
from bench.summary_scale import scale_section

RESULTS = Path(__file__).resolve().parent / "results"


# -- sections ----------------------------------------------------------------------------------
def cost_section(doc: Doc, path: Path) -> str:
    out = []
    for key, res in doc["results"].items():
        s = res.get("settings", {})
        out.append(f"**{key}** — {s.get('description', '')}; region "
                   f"{num(s.get('region_params'))} params ({num(s.get('region_bytes', 0) / 1e6)}"
                   f" MB); rounds: {_rounds(s.get('rounds'))}; (c),(d) measured up to N="
                   f"{s.get('cap_full_c_d')}, (c') up to N={s.get('cap_tails_c_prime')}, "
                   "extrapolated beyond (marked *).")
        pts = {(m, p["n"], p["batch"]): p for m, info in res["methods"].items()
               for p in info["points"]}
        ns = sorted({n for (_, n, _) in pts})
        methods = list(res["methods"])

        def cell(m: str, n: int, b: int, field: str, pts: dict[Any, Any] = pts) -> str:
            p = pts.get((m, n, b))
            if p is None:
                return "–"
            return num(p[field]["median"]) + ("*" if p["extrapolated"] else "")
        out.append("\nLatency at batch 1 (ms per request, median over rounds):\n")
        out.append(table(["N", *methods], [[n, *(cell(m, n, 1, "ms_per_call") for m in methods)]
                                           for n in ns]))
        out.append("\nThroughput at batch 32 (inputs/s, median):\n")
        out.append(table(["N", *methods], [[n, *(cell(m, n, 32, "items_per_s") for m in methods)]
                                           for n in ns]))
        cpu = res.get("ratios_cpu", {})
        out.append("\nCost ratios at batch 32 (other / (a), per round; median (min–max)); the "
                   "same in process CPU time (median), which waiting for a busy core does not "
                   "inflate:\n")
        out.append(table(["N", "(c)/(a)", "(c')/(a)", "(d)/(a)", "(b)/(a)", "CPU (c)/(a)",
                          "CPU (c')/(a)", "CPU (d)/(a)"], [
            [n, *(span(res["ratios"][f"{n}|32"][m], 2) for m in ("c", "c'", "d", "b")),
             *(num(cpu.get(f"{n}|32", {}).get(m, {}).get("median"), 2)
               for m in ("c", "c'", "d"))]
            for n in ns if f"{n}|32" in res["ratios"]]))
        flat, flat_cpu = res.get("a_flatness", {}), res.get("a_flatness_cpu", {})
        if flat:
            out.append(f"\n(a) at N={ns[-1]} / (a) at N={ns[0]}, per round: batch 1 "
                       f"{span(flat.get('1'), 3)}, batch 32 {span(flat.get('32'), 3)}; in CPU "
                       f"time {num(flat_cpu.get('1', {}).get('median'))} and "
                       f"{num(flat_cpu.get('32', {}).get('median'))}.")
        out += _cost_pieces(res)
        out += _cost_compose(res)
        out.append("")
    return "\n".join(out)


def _cost_pieces(res: Doc) -> list[str]:
    """The pieces table of one cost preset: trunk, tails, full forwards, crossover N*."""
    rows = []
    for b, br in res["breakdown"].items():
        rows.append([b, span(br["trunk"]), span(br["tail_plain"]), span(br["tail_jvp"]),
                     span(br["jvp_tail_over_plain_tail"], 2), span(br["full_plain"]),
                     span(br["full_jvp_naive"]), num(br.get("crossover_n_vs_c_prime"))])
    return ["\nPieces (ms per call): trunk, one plain tail, the JVP tail, a full plain "
            "forward, the whole network under JVP (no trunk split); N* = where (c') "
            "meets (a):\n",
            table(["batch", "trunk", "plain tail", "JVP tail", "JVP/plain",
                   "full plain", "full JVP", "N*"], rows)]


def _cost_compose(res: Doc) -> list[str]:
    """Σ w_k Δ_k against copy_ of the same bytes, per N, with the linear fit."""
    comp = res["compose"]
    fit = comp["linear_fit_ms_vs_mb"]
    return [f"\nΣ w_k Δ_k (the cache miss of (b)) vs `copy_` of the same bytes "
            f"(|Δ| = {num(comp['delta_bytes'] / 1e6)} MB; linear fit "
            f"{num(fit['slope'])} ms/MB, R² {num(fit['r2'])}):\n",
            table(["N", "MB", "compose ms", "compose GB/s", "in-place add_ GB/s",
                   "copy_ GB/s", "compose/copy"], [
                [p["n"], num(p["bytes"] / 1e6), span(p["compose_ms"]),
                 num(p["compose_gb_per_s"]["median"]), num(p["add_inplace_gb_per_s"]["median"]),
                 num(p["copy_gb_per_s"]["median"]), span(p["compose_over_copy_bandwidth"], 2)]
                for p in comp["points"]])]


def _rounds(rounds: Any) -> str:
    if isinstance(rounds, dict):
        return ", ".join(f"{k} {v}" for k, v in rounds.items())
    return str(rounds)


def serving_section(doc: Doc, path: Path) -> str:
    res = doc["results"]
    off = res["offline"]
    cmp = res["comparison"]
    rows = []
    for mode, levels in res["load"].items():
        for conc, r in levels.items():
            c = cmp.get(f"{mode}|{conc}", {})
            rows.append([mode, conc, num(r["throughput_inputs_per_s"]),
                         num(r["latency_ms"]["p50"]), num(r["latency_ms"]["p99"]),
                         num(r["mean_batch_size"]), num(r["mean_groups_per_batch"]),
                         num(c.get("offline_inputs_per_s_at_mean_batch")),
                         num(c.get("throughput_over_offline_at_mean_batch"), 2),
                         num(r.get("server_cpu_cores"), 2),
                         num(r.get("server_cpu_ms_per_input")),
                         num(c.get("server_cpu_per_input_over_offline"), 2), r["errors"]])
    out = [table(["workload", "clients", "inputs/s", "p50 ms", "p99 ms", "mean batch",
                  "groups/batch", "offline inputs/s at that batch", "service/offline",
                  "server CPU cores", "server CPU ms/input", "÷ offline CPU/input", "errors"],
                 rows)]
    out.append("\nWhere the time goes, server side (means over the window, ms): the trunk pass "
               "per device batch (– in runs before that metric existed), the tangent tail per "
               "composition group, the wait from admission to a batch, the whole request inside "
               "the app's middleware; the client's p50 for comparison:\n")
    out.append(table(["workload", "clients", "trunk", "tail per group", "queue wait",
                      "request (server)", "p50 (client)"], [
        [mode, conc, num(r.get("server_trunk_ms_mean")), num(r.get("server_forward_ms_mean")),
         num(r.get("server_queue_wait_ms_mean")),
         num(r.get("server_request_ms_mean")), num(r["latency_ms"]["p50"])]
        for mode, levels in res["load"].items() for conc, r in levels.items()]))
    out.append("\nOffline `Executor.run` (same base and composition, in-process; ms per call, "
               "median (min–max) over rounds before and after the load):\n")
    out.append(table(["batch", "ms per call", "inputs/s"], [
        [b, span(v["ms_per_call"]), num(v["inputs_per_s"]["median"])] for b, v in off.items()]))
    return "\n".join(out)


def memory_section(doc: Doc, path: Path) -> str:
    variants = doc["results"]["variants"]
    names = list(variants)
    stages = [s["stage"] for s in variants[names[0]]["stages"]]
    rows = []
    for i, stage in enumerate(stages):
        row = [stage, num(variants[names[0]]["stages"][i]["cache_bytes"] / 2**20)]
        for n in names:
            st = variants[n]["stages"][i]
            row += [num(st["rss_bytes"] / 2**20), num(st["rss_growth_bytes"] / 2**20)]
        rows.append(row)
    header = ["stage", "tensors cached MiB"]
    for n in names:
        header += [f"RSS MiB ({n})", "growth MiB"]
    return table(header, rows)


def compose_bandwidth_section(doc: Doc, path: Path) -> str:
    out = []
    for preset, by_policy in doc["results"].items():
        policies = list(by_policy)
        header = ["N", "N·|Δ| MB"] + [f"{h} ({p})" for p in policies
                                      for h in ("compose GB/s", "copy GB/s", "ratio")]
        rows = []
        for i, point in enumerate(by_policy[policies[0]]["points"]):
            row = [point["n"], num(point["gb"] * 1e3)]
            for p in policies:
                q = by_policy[p]["points"][i]
                row += [num(q["compose_gb_per_s"]), num(q["copy_gb_per_s"]),
                        num(q["compose_over_copy"]["median"])]
            rows.append(row)
        out += [f"**{preset}** (|Δ| = {num(by_policy[policies[0]]['delta_bytes'] / 1e6)} MB):",
                "", table(header, rows), ""]
    return "\n".join(out)


def generic_section(doc: Doc, path: Path) -> str:
    """Numeric leaves (up to depth 3, 40 rows) for a benchmark this file does not know."""
    rows: list[list[Any]] = []

    def walk(prefix: str, value: Any, depth: int) -> None:
        if len(rows) >= 40 or depth > 3:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if k not in ("machine", "settings", "targets", "raw_seconds"):
                    walk(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append([prefix, num(float(value))])
    walk("", doc.get("results", doc), 0)
    return table(["figure", "value"], rows) if rows else "(no numeric figures)"


def overhead_section(doc: Doc, path: Path) -> str:
    """The table bench.overhead writes next to its JSON, else the generic figures."""
    md = path.with_suffix(".md")
    if md.is_file():
        return md.read_text().strip()
    return generic_section(doc, path)


def gpu_section(doc: Doc, path: Path) -> str:
    """bench.gpu_check: correctness, precision, compile, memory, timings, HTTP per preset."""
    parts = []
    for preset, res in doc["results"]["presets"].items():
        parts += [f"### {preset} ({res.get('data', '')})", ""]
        corr = res.get("correctness", {})
        if "passed" in corr:
            parts.append(
                f"Correctness on the device, float32 vs a float64 CPU reference: "
                f"{'all held' if corr['passed'] else '**FAILED**'} — composed rel. error "
                f"{num(corr['composed_vs_float64_rel'])}, linearity rel. "
                f"{num(corr['linearity_rel'])}, weight-1 round trip max |Δ| "
                f"{num(corr['weight1_round_trip_max_abs'])}, zero tangent max |Δ| "
                f"{num(corr['zero_tangent_vs_base_max_abs'])}, forgetting bit-exact "
                f"{corr['forget_bit_exact']}.")
            parts.append("")
        dt = res.get("dtypes", {})
        rows = [[name, which, num(m["max_abs_dlogit"]), num(m["logit_scale"]),
                 num(m["top1_agreement"], 4), num(m["accuracy"])]
                for name in ("bfloat16", "float16") for which, m in dt.get(name, {}).items()]
        if rows:
            parts += [table(["dtype", "model", "max abs dlogit", "max abs logit (fp32)",
                             "top-1 agreement", "accuracy"], rows), ""]
        t = res.get("timings", {})
        if "per_batch" in t:
            parts += [table(["batch", "plain ms", "linearized ms", "ratio", "÷ FLOP floor"],
                            [[b, num(v["plain_ms"]), num(v["linearized_ms"]), num(v["ratio"]),
                              num(v["ratio_over_flop_floor"])]
                             for b, v in t["per_batch"].items()]), ""]
            parts.append("Cost vs N at batch 32 (ms): " + ", ".join(
                f"N={n}: {num(ms)}" for n, ms in t["by_n_ms_batch32"].items()) + "")
            parts.append("")
        extra = {k: res[k] for k in ("compile", "memory", "http") if k in res}
        for key, sec in extra.items():
            shown = {k: v for k, v in sec.items() if k not in ("traceback",)}
            parts.append(f"- {key}: `{json.dumps(shown, default=str)[:600]}`")
        errors = [f"{k}: {v['error']}" for k, v in res.items()
                  if isinstance(v, dict) and "error" in v]
        parts += [f"- **error** {e}" for e in errors] + [""]
    return "\n".join(parts)


# -- assembly ----------------------------------------------------------------------------------
Renderer = Callable[[Doc, Path], str]
SECTIONS: tuple[tuple[str, str, Renderer, str], ...] = (
    ("overhead", "Linearized forward vs plain forward", overhead_section,
     "Cost of one linearized forward (trunk plain + tail JVP) against a plain forward and "
     "against the whole network under JVP, per tangent region; FLOP floor of DESIGN.md §2."),
    ("cost", "1. Cost vs number of components", cost_section,
     "(a) TMC with the composed Δ cached; (b) first request of a new composition (Σ on the "
     "request); (c) N full non-linear models; (c') N non-linear tails sharing one trunk pass; "
     "(d) N separate linearized models. The (c)/(c') models are perturbed copies: only their "
     "cost is measured."),
    ("compose_bandwidth", "1b. Summing a new composition: bandwidth", compose_bandwidth_section,
     "Σ w_k Δ_k (`tangent.compose`) next to `Tensor.copy_` of the same N·|Δ| bytes, in "
     "child processes under the OpenMP wait policy `tmc serve` runs with (unset) and under "
     "PASSIVE (what the other benchmarks set); ratio = copy time / compose time per round."),
    ("serving", "3. Serving under load", serving_section,
     "`tmc serve` over loopback HTTP, closed-loop clients, one 28×28 PNG per request; "
     "homogeneous = one composition for all clients, mixed = 8 distinct compositions."),
    ("memory", "4. Memory", memory_section,
     "Server RSS while adding, composing and forgetting components, next to the exact "
     "tensor accounting (`tmc_cache_bytes`)."),
    ("scale", "6. Registry at scale", scale_section,
     "`bench.scale`: Redis index + S3 bytes (weed mini) and SQLite + files, both started on "
     "loopback; add, resolve and forget latency as the registry grows, Redis memory per "
     "component, and the cost of \"*\" with 1,000 active components."),
    ("gpu", "GPU check (`make gpu-check`)", gpu_section,
     "`python -m bench.gpu_check` on a CUDA device: float32 correctness against a float64 "
     "reference, bf16/fp16 against fp32 on real test rows, compiled tail, memory after "
     "forgetting, timings, and HTTP serving against the offline executor."),
)


def section(title: str, intro: str, results: Path, name: str, render: Renderer) -> str:
    doc, path = pick(name, results)
    if doc is None or path is None:
        return f"## {title}\n\n_No results yet (`{name}.json` missing)._\n"
    parts = [f"## {title}", "", source_line(doc, path), ""]
    if intro:
        parts += [intro, ""]
    try:
        parts.append(render(doc, path))
    except Exception as exc:  # a changed format must not break the whole summary
        parts.append(f"_Could not render `{path.name}`: {type(exc).__name__}: {exc}_")
    tt = targets_table(doc)
    if tt:
        parts += ["", tt]
    parts.append(png_link(path))
    return "\n".join(parts)


def overview(results: Path) -> str:
    rows = []
    picked = [(name, *pick(name, results)) for name in
              ("overhead", "cost", "compose_bandwidth", "serving", "memory",
               "scale", "gpu")]
    picked += [(f"accuracy {doc.get('experiment')}", doc, path)
               for doc, path in accuracy_docs(results)]
    for name, doc, path in picked:
        if doc is None or path is None or not isinstance(doc.get("targets"), dict):
            continue
        for tname, t in doc["targets"].items():
            if isinstance(t, dict):
                rows.append([name + (" (quick)" if doc.get("quick") else ""), tname,
                             num(t.get("value")),
                             f"{t.get('op', '')} {num(t.get('threshold'))}",
                             "✅" if t.get("met") else "❌"])
    return table(["benchmark", "target", "value", "threshold", "met"], rows) if rows else \
        "_No targets recorded yet._"


def run_status(results: Path) -> str:
    for stem in ("run_all", "run_all_quick"):
        doc = load(results / f"{stem}.json")
        if doc and isinstance(doc.get("steps"), list):
            rows = [[s.get("name"), s.get("status"), num(s.get("seconds")), s.get("detail", "")]
                    for s in doc["steps"]]
            last = doc.get("last_invocation") or {}
            elapsed = (f"{num(last.get('elapsed_seconds'))} s elapsed with --jobs "
                       f"{last.get('jobs')} for {len(last.get('steps', []))} of "
                       f"{len(rows)} steps; " if last else "")
            return (f"Last `python -m bench.run_all{' --quick' if doc.get('quick') else ''}`"
                    f" ({doc.get('written', '?')}, {elapsed}steps summed "
                    f"{num(doc.get('wall_seconds'))} s):\n\n"
                    + table(["benchmark", "status", "seconds", "detail"], rows))
    return ""


HEADER = """# Benchmark summary

Generated by `python -m bench.summary` (run by `make bench` / `make bench-quick`) from
`bench/results/*.json`; each section names its file and the machine. Figures are medians
over repeated, interleaved rounds with min–max in brackets; ratios are taken per round
within one process run. The machine is a small shared VM: when other jobs run at the same
time (see the load average in each section), absolute timings are several times slower
than on an idle machine and the spread is wide; ratios measured side by side hold up better
than absolute numbers.
"""


def build(results: Path = RESULTS) -> str:
    parts = [HEADER]
    status = run_status(results)
    if status:
        parts += [status, ""]
    parts += ["## Targets at a glance", "", overview(results), ""]
    for name, title, render, intro in SECTIONS:
        parts += [section(title, intro, results, name, render), ""]
    parts.append(accuracy_block(results))
    return "\n".join(parts).rstrip() + "\n"


def write_summary(results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / "SUMMARY.md"
    path.write_text(build(results))
    return path


def main() -> int:
    print(write_summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
