"""The accuracy part of SUMMARY.md: one block per experiment (bench.accuracy's files), TMC
next to the paper's baselines, the continual and forgetting figures.

Policy: per experiment the full run's file wins over the quick run's; validation sweeps,
partial files and the trunk-cache check are listed by name only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.summary_format import Doc, load, num, source_line, table, targets_table

ACCURACY_METHODS = (
    ("tmc_mean", "TMC (mean of the components)"), ("tmc_sum", "TMC (sum)"),
    ("nl_ensemble_softmax", "non-linear ensemble (softmax mean)"),
    ("nl_ensemble_logits", "non-linear ensemble (logit mean)"),
    ("nl_weight_average", "non-linear weight average"),
    ("component_alone_mean", "one tangent component alone (mean)"),
    ("nl_alone_mean", "one non-linear fine-tune alone (mean)"),
    ("joint_tangent", "joint tangent fine-tune (all data)"),
    ("linear_probe", "linear probe (all data)"), ("base_theta0", "θ0 (untrained head)"))


def mean_spread(stats: Any) -> str:
    """'mean ± std (min–max)' of a spread dict, or a plain number (single-seed files)."""
    if isinstance(stats, dict) and "mean" in stats:
        return (f"{stats['mean']:.3f} ± {stats.get('std', 0.0):.3f} "
                f"({stats['min']:.3f}–{stats['max']:.3f})")
    return num(stats)


def seed_count(stats: Any, seeds: int) -> str:
    """' (first k of n seeds)' when a figure exists for fewer seeds than the run had."""
    k = len(stats.get("values", [])) if isinstance(stats, dict) else seeds
    return f" (first {k} of {seeds} seeds)" if k < seeds else ""


def accuracy_experiment(doc: Doc, path: Path) -> str:
    test = doc.get("accuracy", {}).get("test", {})
    s = doc.get("settings", {})
    seeds = doc.get("seeds", [s.get("experiment", {}).get("seed", 0)])
    tangent, nl = s.get("tangent", {}), s.get("nonlinear", {})
    exp = s.get("experiment", {})
    parts = [f"### {doc.get('experiment', path.stem)}", "",
             source_line(doc, path), "",
             f"{len(seeds)} seed(s) {seeds}; {num(s.get('pool_rows'))} training rows in "
             f"{exp.get('tasks', '?')} tasks; test rows {num(test.get('rows'))}; tangent κ="
             f"{num(tangent.get('kappa'))}, lr {num(tangent.get('lr'))}, {tangent.get('epochs')}"
             f" epochs; non-linear lr {num(nl.get('lr'))}; chosen on the validation split "
             f"({exp.get('selected_on') or 'see the *_select.json files'}); seeds vary "
             f"{s.get('seeds_vary', 'the training seed')}.", "",
             table(["method", "test accuracy, mean ± std (min–max over seeds)"],
                   [[label + seed_count(test.get(key), len(seeds)),
                     mean_spread(test.get(key))] for key, label in ACCURACY_METHODS
                    if key in test])]
    c = doc.get("continual")
    if isinstance(c, dict):
        keys = ("tmc_mean", "nl_ensemble_softmax", "nl_weight_average",
                "newest_component_alone")
        rows = [[k, c["rows"][i], *(f"{c[key][i]['mean']:.3f}" for key in keys)]
                for i, k in enumerate(c["k"])]
        parts += ["", f"Continual (tasks arrive one by one; mean over seeds; scored on "
                  f"{c.get('scope')}):", "",
                  table(["k", "rows", "TMC", "NL ensemble", "NL weight avg", "newest alone"],
                        rows)]
    f = doc.get("forgetting")
    if isinstance(f, dict):
        rows = [[r["forgotten"], num(r["own_rows_with"]), num(r["own_rows_after_forget"]),
                 num(r["own_rows_never"]), num(r["other_rows_with"]),
                 num(r["other_rows_after_forget"]),
                 "yes" if r["delta_bit_identical_to_never"] and
                 r["logits_bit_identical_to_never"] else "**no**"] for r in f["per_component"]]
        parts += ["", f"Forgetting (first seed; registry forget vs a registry that never had "
                  f"it; own rows = {f.get('own_rows_are')}, other rows = "
                  f"{f.get('other_rows_are')}):", "",
                  table(["forgotten", "own: with", "own: after forget", "own: never",
                         "other: with", "other: after forget", "bit-identical to never"],
                        rows)]
    tt = targets_table(doc)
    if tt:
        parts += ["", tt]
    if doc.get("note"):
        parts += ["", f"_Note: {doc['note']}_"]
    return "\n".join(parts)


def accuracy_docs(results: Path) -> list[tuple[Doc, Path]]:
    """The main result per experiment (full run, else quick); sweeps and caches left out."""
    chosen: dict[str, tuple[Doc, Path]] = {}
    for path in sorted(results.glob("accuracy_*.json")):
        stem = path.stem.removeprefix("accuracy_")
        if any(t in stem for t in ("_select", ".partial", "cache_")):
            continue
        name = stem.removesuffix("_quick")
        doc = load(path)
        if doc is None or not doc.get("accuracy", {}).get("test"):
            continue
        if name not in chosen or not stem.endswith("_quick"):
            chosen[name] = (doc, path)
    return list(chosen.values())


def accuracy_block(results: Path) -> str:
    docs = accuracy_docs(results)
    if not docs:
        return "## 5. Accuracy\n\n_No results yet (`accuracy_*.json` missing)._\n"
    parts = ["## 5. Accuracy (TMC vs the paper's baselines)", ""]
    for png in ("accuracy.png", "accuracy_forgetting.png", "accuracy_quick.png",
                "accuracy_forgetting_quick.png"):
        if (results / png).is_file() and (not png.endswith("_quick.png") or not any(
                (results / p).is_file() for p in ("accuracy.png",))):
            parts += [f"![{png.removesuffix('.png')}]({png})", ""]
    for doc, path in docs:
        try:
            parts += [accuracy_experiment(doc, path), ""]
        except Exception as exc:  # a changed format must not break the whole summary
            parts += [f"_Could not render `{path.name}`: {type(exc).__name__}: {exc}_", ""]
    others = sorted(p.name for p in results.glob("accuracy_*.json")
                    if p not in {path for _, path in docs})
    if others:
        parts.append("Other accuracy files (validation sweeps, trunk-cache check, quick runs): "
                     + ", ".join(f"`{o}`" for o in others))
    return "\n".join(parts)
