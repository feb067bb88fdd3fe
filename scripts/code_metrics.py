"""Code-health figures of a checkout: function length, module size, `Any` in signatures.

    python scripts/code_metrics.py [ROOT] [--json]

Per top-level package (tests excluded): how many functions, the median and p90 of their
length (``def`` line to last line, decorators excluded), the longest, how many exceed 60
lines, the share of signatures that mention ``Any`` (in a parameter or the return
annotation), and the modules over 300 and 400 lines. ``hand-written deploy checks`` counts
the lines of scripts/deploy_check*.py. Only the standard library, so it also runs on an
old checkout (``git worktree add /tmp/old <rev>``) for before/after figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGES = ("tangent", "bases", "registry", "app", "training", "cli", "loopback", "bench",
            "scripts")
LONG_FUNCTION = 60
ANY_IN_STRING = re.compile(r"\bAny\b")


@dataclass
class PackageFigures:
    functions: int = 0
    median_lines: float = 0.0
    p90_lines: float = 0.0
    longest: str = ""
    over_60: list[str] = field(default_factory=list)
    any_share: float = 0.0
    modules_over_300: list[str] = field(default_factory=list)
    modules_over_400: list[str] = field(default_factory=list)


def mentions_any(annotation: ast.expr | None) -> bool:
    """True when an annotation names typing.Any (also inside a string annotation)."""
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Any":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Any":
            return True
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and ANY_IN_STRING.search(node.value)):
            return True
    return False


def signature_has_any(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    args = fn.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs,
             *(a for a in (args.vararg, args.kwarg) if a is not None)]
    return mentions_any(fn.returns) or any(mentions_any(a.annotation) for a in every)


def functions_of(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def p90(values: list[int]) -> float:
    """The 90th percentile, statistics.quantiles' default (exclusive) method."""
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else float(values[0])


def package_figures(root: Path, package: str) -> PackageFigures | None:
    files = sorted((root / package).rglob("*.py"))
    if not files:
        return None
    figures = PackageFigures()
    lengths: list[int] = []
    with_any = 0
    longest = (0, "")
    for path in files:
        rel = path.relative_to(root).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > 300:
            figures.modules_over_300.append(f"{rel} ({lines})")
        if lines > 400:
            figures.modules_over_400.append(f"{rel} ({lines})")
        for fn in functions_of(path):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            lengths.append(length)
            with_any += signature_has_any(fn)
            where = f"{rel}:{fn.lineno} {fn.name} ({length})"
            longest = max(longest, (length, where))
            if length > LONG_FUNCTION:
                figures.over_60.append(where)
    if not lengths:
        return figures
    figures.functions = len(lengths)
    figures.median_lines = statistics.median(lengths)
    figures.p90_lines = round(p90(lengths), 1)
    figures.longest = longest[1]
    figures.any_share = round(with_any / len(lengths), 3)
    return figures


def deploy_check_lines(root: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (root / "scripts").glob("deploy_check*.py"))


def report(root: Path) -> dict[str, object]:
    per_package = {p: package_figures(root, p) for p in PACKAGES}
    return {
        "packages": {p: asdict(f) for p, f in per_package.items() if f is not None},
        "hand_written_deploy_check_lines": deploy_check_lines(root),
    }


def print_table(figures: dict[str, object]) -> None:
    packages = figures["packages"]
    assert isinstance(packages, dict)
    print(f"{'package':10} {'fns':>5} {'median':>6} {'p90':>6} {'>60':>4} {'Any':>6} "
          f"{'>300':>5} {'>400':>5}  longest")
    for name, f in packages.items():
        print(f"{name:10} {f['functions']:5} {f['median_lines']:6} {f['p90_lines']:6} "
              f"{len(f['over_60']):4} {f['any_share']:6.1%} {len(f['modules_over_300']):5} "
              f"{len(f['modules_over_400']):5}  {f['longest']}")
    print(f"hand-written deploy checks: {figures['hand_written_deploy_check_lines']} lines")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=".", type=Path)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = report(args.root)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
