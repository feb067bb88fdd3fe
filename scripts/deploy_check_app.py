"""What the deploy checks need to know about the app itself, read from the code, not restated.

- ``app.settings``: the env names the app reads (``ENV_NAMES``) and ``Settings`` to parse the
  rendered env with; env names the code reads that are not settings are listed once in
  INTERNAL_ENV, each with its reason, and any other ``TMC_*`` name in the code is an error;
- the HTTP routes (``create_app(...).openapi()``): probe paths must be GET routes, and the
  admin router's paths must never be routed by the Ingress;
- ``registry.s3_blobs.parse_s3_url``: the chart's ``TMC_BLOB_URL`` must be one the app accepts.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]

# TMC_* names the code reads that are not service settings: the chart must never set them.
INTERNAL_ENV = {
    "TMC_DEBUG": "cli/main.py: re-raise unexpected CLI errors with their traceback",
    "TMC_SERVER": "cli/client_cmds.py: the CLI client's default --server, not a server setting",
    "TMC_TEST_CRASH_POINT": "registry/core.py: crash-consistency test hook (SIGKILL at a point)",
}
SOURCE_SKIP = {"tests", "scripts", "bench", "helm"}


@contextmanager
def repo_on_path() -> Iterator[None]:
    sys.path.insert(0, str(ROOT))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT))


@contextmanager
def without_tmc_env() -> Iterator[None]:
    """The caller's TMC_* variables taken out of the environment (Settings would read them),
    put back afterwards."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("TMC_")}
    try:
        yield
    finally:
        os.environ.update(saved)


@functools.cache
def settings_module() -> ModuleType:
    with repo_on_path():
        import app.settings as settings  # noqa: PLC0415 (the repo under test)
    return settings


@functools.cache
def s3_url_parser() -> Callable[[str], object]:
    with repo_on_path():
        from registry.s3_blobs import parse_s3_url  # noqa: PLC0415 (the repo under test)
    return parse_s3_url


@functools.cache
def http_routes() -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """(path -> HTTP methods of every route, the admin router's paths), from the app's code."""
    with repo_on_path():
        from app.main import create_app  # noqa: PLC0415 (the repo under test)
        from app.routes import admin  # noqa: PLC0415
    with without_tmc_env():
        paths = create_app(settings_module().Settings()).openapi()["paths"]
    routes = {p: frozenset(m.upper() for m in methods) for p, methods in paths.items()}
    return routes, frozenset(str(getattr(r, "path", "")) for r in admin.router.routes)


def settings_error(env: dict[str, str]) -> str | None:
    """Parse the TMC_* values of env as the app would; None if fine, else the error text."""
    settings = settings_module()
    fields = settings.Settings.model_fields
    kwargs = {k[4:].lower(): v for k, v in env.items()
              if k.startswith("TMC_") and k[4:].lower() in fields}
    with without_tmc_env():
        try:
            settings.Settings(**kwargs)
        except Exception as exc:  # pydantic.ValidationError
            return " ".join(str(exc).split())
    return None


def source_packages() -> list[Path]:
    return sorted(p for p in ROOT.iterdir() if (p / "__init__.py").is_file()
                  and p.name not in SOURCE_SKIP)


def unlisted_env_names() -> list[str]:
    """``file reads TMC_X`` for each TMC_* name in the code that is neither a setting
    (``ENV_NAMES``) nor in INTERNAL_ENV: the chart checks could not see it."""
    known = set(settings_module().ENV_NAMES) | set(INTERNAL_ENV)
    found: dict[str, str] = {}
    for pkg in source_packages():
        for py in sorted(pkg.rglob("*.py")):
            for m in re.finditer(r"[\"'](TMC_[A-Z0-9_]+)[\"']", py.read_text(errors="replace")):
                found.setdefault(m.group(1), str(py.relative_to(ROOT)))
    return [f"{where} reads {name}, which is neither in app.settings.ENV_NAMES nor in "
            "INTERNAL_ENV of scripts/deploy_check_app.py (add it to one, with its reason)"
            for name, where in sorted(found.items()) if name not in known]
