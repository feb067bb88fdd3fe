"""Reading result files and writing Markdown for bench/results/SUMMARY.md.

Policy: a missing or unreadable file is ``None`` (the summary says so in one line, never
fails); a full run's file wins over the quick run's. Numbers print with 3 significant digits
(fewer decimals from 10 up), a missing or non-finite figure as "–".
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Doc = dict[str, Any]


# -- loading -----------------------------------------------------------------------------------
def load(path: Path) -> Doc | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def pick(name: str, results: Path) -> tuple[Doc | None, Path | None]:
    """The full run's file if there is one, else the quick run's."""
    for stem in (name, f"{name}_quick"):
        path = results / f"{stem}.json"
        doc = load(path) if path.is_file() else None
        if doc is not None:
            return doc, path
    return None, None


# -- formatting --------------------------------------------------------------------------------
def num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        mag = abs(x)
        if mag >= 100:
            return f"{x:.0f}"
        if mag >= 10:
            return f"{x:.1f}"
        return f"{x:.{digits - 1}f}" if mag >= 1 else f"{x:.{digits}g}"
    return str(x)


def span(stats: Any, digits: int = 3) -> str:
    """'median (min–max)' of a summary dict."""
    if not isinstance(stats, dict) or stats.get("median") is None:
        return "–"
    return (f"{num(stats['median'], digits)} ({num(stats.get('min'), digits)}–"
            f"{num(stats.get('max'), digits)})")


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def source_line(doc: Doc, path: Path) -> str:
    m = doc.get("machine")
    parts = [f"file `{path.name}`"]
    if doc.get("quick"):
        parts.append("**quick (smoke) run**")
    if doc.get("written"):
        parts.append(f"written {doc['written']}")
    if isinstance(m, dict):
        load_avg = m.get("load_average_at_start")
        parts.append(f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, torch "
                     f"{m.get('torch', '?')} ({m.get('torch_threads', '?')} threads), "
                     f"{m.get('device', '?')}")
        if isinstance(load_avg, list) and load_avg:
            parts.append(f"load average at start {load_avg[0]:.1f}")
    return "_" + "; ".join(parts) + "_"


def png_link(path: Path) -> str:
    png = path.with_suffix(".png")
    return f"\n![{png.stem}]({png.name})\n" if png.is_file() else ""


def targets_table(doc: Doc) -> str:
    targets = doc.get("targets")
    if not isinstance(targets, dict) or not targets:
        return ""
    rows = []
    for name, t in targets.items():
        if not isinstance(t, dict):
            continue
        rows.append([name, num(t.get("value")), f"{t.get('op', '')} {num(t.get('threshold'))}",
                     "✅ met" if t.get("met") else "❌ not met", t.get("note", "")])
    return "Targets:\n\n" + table(["target", "value", "threshold", "", "note"], rows)
