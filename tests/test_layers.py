"""The dependency rule between the top-level packages, checked on every import statement.

    cli → (app, training),   app → registry → tangent,   bases → tangent,
    training → (registry, bases, tangent)

and never back. In full (a package may always import itself):

- tangent imports no other package of ours.
- bases imports tangent only. Not registry: a base is θ0 and its preprocessing, the
  registry stores components of a base by its fingerprint (tangent.fingerprint); neither
  needs the other, and today bases imports tangent alone.
- registry imports tangent only.
- training imports registry, bases and tangent (never app).
- app imports registry, bases and tangent (it serves bases; never training).
- cli, the command line, imports app, training, registry, bases and tangent; nothing
  below it imports cli.
- tests import any package except bench. tests/bench runs bench's commands in subprocesses
  (``python -m bench.…``), which tests the top layer through its command line and is not an
  import; tests/deploy loads scripts/deploy_check.py by path (scripts/ is no package).
- bench and scripts are the top layer: they import anything except tests.
- loopback (the redis-server and ``weed mini`` launchers of tests, bench and scripts; not
  part of the installed product) imports no other package of ours; only tests, bench and
  scripts import it.

A new top-level package fails ``test_every_package_has_a_layer`` until it is given its row
in ``MAY_IMPORT``.

What counts as an import: every ``import x.y`` and ``from x import y`` statement, at module
level or inside a function or an ``if TYPE_CHECKING:`` block, relative ones resolved against
the importing file's package, and ``importlib.import_module("x.y")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = frozenset({"tangent", "bases", "registry", "training", "app", "cli"})
TOP = frozenset({"bench", "scripts"})
TOOLS = frozenset({"loopback"})  # beside the product, for tests and the top layer
MAY_IMPORT: dict[str, frozenset[str]] = {
    "loopback": frozenset(),
    "tangent": frozenset(),
    "bases": frozenset({"tangent"}),
    "registry": frozenset({"tangent"}),
    "training": frozenset({"registry", "bases", "tangent"}),
    "app": frozenset({"registry", "bases", "tangent"}),
    "cli": frozenset({"app", "training", "registry", "bases", "tangent"}),
    "tests": PRODUCT | TOOLS | {"scripts"},
    "bench": PRODUCT | TOOLS | TOP,
    "scripts": PRODUCT | TOOLS | TOP,
}

# Back edges allowed for now, as (importing file, imported module): none since issue 15 (the
# command line moved to cli/, the accuracy protocols to training/). Frozen: a new back edge
# fails test_no_import_breaks_the_layers, and one listed here that is gone fails
# test_every_allowed_back_edge_still_exists until it is struck from this list.
KNOWN_BACK_EDGES: frozenset[tuple[str, str]] = frozenset()


class Import(NamedTuple):
    file: str  # relative to the repository root, with "/"
    line: int
    module: str  # the imported module, absolute


def packages(root: Path) -> list[str]:
    """Our top-level packages (directories with an __init__.py; a virtual environment or a
    build/ directory has none), and scripts/."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (
        (p / "__init__.py").is_file() or p.name in TOP))


def _literal_import_module(node: ast.AST) -> str | None:
    """The name in ``importlib.import_module("x")`` / ``import_module("x")``, if literal."""
    if not (isinstance(node, ast.Call) and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return node.args[0].value if name == "import_module" else None


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in one file (module level and nested), relative ones made absolute."""
    rel = path.relative_to(root)
    package = list(rel.parent.parts)  # a module's package; __init__.py: its own directory
    found: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(rel))):
        if isinstance(node, ast.Import):
            found += [Import(rel.as_posix(), node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append(Import(rel.as_posix(), node.lineno, module))
        elif (name := _literal_import_module(node)) is not None:
            found.append(Import(rel.as_posix(), getattr(node, "lineno", 0), name))
    return found


def back_edges(root: Path) -> list[tuple[Import, str, str]]:
    """(import, importing package, imported package) for every import the rule forbids."""
    ours = set(packages(root))
    bad = []
    for pkg in sorted(ours & set(MAY_IMPORT)):
        for path in sorted((root / pkg).rglob("*.py")):
            for imp in imports_of(path, root):
                target = imp.module.split(".", 1)[0]
                if target in ours and target != pkg and target not in MAY_IMPORT[pkg]:
                    bad.append((imp, pkg, target))
    return bad


def _describe(imp: Import, pkg: str, target: str) -> str:
    allowed = ", ".join(sorted(MAY_IMPORT[pkg])) or "no other package of ours"
    return (f"{imp.file}:{imp.line} imports {imp.module}: {pkg} → {target} breaks the layers "
            f"({pkg} may import {allowed})")


def test_every_package_has_a_layer() -> None:
    missing = [p for p in packages(ROOT) if p not in MAY_IMPORT]
    assert not missing, (f"top-level packages without a layer: {missing}; give each its row "
                         "in tests/test_layers.py MAY_IMPORT")


def test_no_import_breaks_the_layers() -> None:
    new = [_describe(*edge) for edge in back_edges(ROOT)
           if (edge[0].file, edge[0].module) not in KNOWN_BACK_EDGES]
    assert not new, "imports against the dependency rule:\n" + "\n".join(new)


def test_every_allowed_back_edge_still_exists() -> None:
    present = {(imp.file, imp.module) for imp, _, _ in back_edges(ROOT)}
    gone = sorted(KNOWN_BACK_EDGES - present)
    assert not gone, (f"allowed back edges that no longer exist: {gone}; strike them from "
                      "KNOWN_BACK_EDGES in tests/test_layers.py")


def test_the_walk_finds_every_kind_of_import(tmp_path: Path) -> None:
    """The checker itself: nested, relative, dotted and import_module imports are seen."""
    (tmp_path / "tangent" / "sub").mkdir(parents=True)
    (tmp_path / "venv" / "lib").mkdir(parents=True)  # not a package of ours: not walked
    (tmp_path / "venv" / "lib" / "x.py").write_text("import app\n")
    for pkg in ("app", "training"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("import tangent\n")  # allowed
    (tmp_path / "tangent" / "__init__.py").write_text("from . import sub\n")  # itself
    (tmp_path / "tangent" / "sub" / "__init__.py").write_text("")
    (tmp_path / "tangent" / "sub" / "deep.py").write_text(
        "import os\n"
        "import app.cli\n"
        "from ...app import service\n"
        "def f():\n"
        "    from training.data import x\n"
        "    import importlib\n"
        "    return importlib.import_module('bench.common')\n")
    found = {(imp.file, imp.line, imp.module, target)
             for imp, _, target in back_edges(tmp_path)}
    deep = "tangent/sub/deep.py"
    assert found == {(deep, 2, "app.cli", "app"), (deep, 3, "app", "app"),
                     (deep, 5, "training.data", "training")}  # bench is not in tmp_path
    for pkg in ("bench", "tests"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "bench" / "common.py").write_text("import tests\n")
    (tmp_path / "tests" / "t.py").write_text("from bench import common\n")
    pairs = {(imp.file, imp.module) for imp, _, _ in back_edges(tmp_path)}
    assert {(deep, "bench.common"), ("bench/common.py", "tests"),
            ("tests/t.py", "bench")} <= pairs
    first = min(back_edges(tmp_path), key=lambda e: (e[0].file, e[0].line))
    assert _describe(*first) == ("bench/common.py:1 imports tests: bench → tests breaks the "
                                 "layers (bench may import app, bases, bench, cli, loopback, "
                                 "registry, scripts, tangent, training)")
