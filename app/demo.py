"""`make run`: the embedded default, ready to try.

First run: create the minilm base (text topics, BBC News labels), train three example
components on disjoint BBC shards (data-incremental), register them in the embedded
registry, then serve. Later runs reuse everything under $TMC_HOME (default .tmc).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

EXAMPLES = 3
EXAMPLE_EPOCHS = 5


def run_demo(overrides: dict[str, Any]) -> int:
    from app.settings import load_settings

    home = Path(os.environ.get("TMC_HOME", ".tmc"))
    token = os.environ.get("TMC_ADMIN_TOKEN") or _stored_token(home)
    settings = load_settings(admin_token=token, **overrides)
    _ensure_base(settings.base_dir)
    files = _ensure_examples(settings.base_dir, home / "examples")
    _register(settings, files)
    _print_welcome(settings.host, settings.port, token, settings.base_dir)
    return _serve(settings)


def _stored_token(home: Path) -> str:
    path = home / "admin-token"
    if not path.is_file():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def _ensure_base(base_dir: Path) -> None:
    from bases import init_base, make_spec

    if (base_dir / "spec.json").is_file():
        return
    print(f"creating the minilm base in {base_dir} …", flush=True)
    init_base(base_dir, make_spec("minilm", name="minilm-bbc"))


def _ensure_examples(base_dir: Path, out_dir: Path) -> list[Path]:
    from app.cli import main as tmc

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(EXAMPLES):
        path = out_dir / f"bbc-shard-{k}.safetensors"
        if not path.is_file():
            print(f"training example component {k + 1}/{EXAMPLES} (BBC shard {k}/{EXAMPLES}) …",
                  flush=True)
            code = tmc(["train", "--base", str(base_dir), "--data", "bbc",
                        "--shard", f"{k}/{EXAMPLES}", "--epochs", str(EXAMPLE_EPOCHS),
                        "--out", str(path)])
            if code != 0:
                raise SystemExit(code)
        files.append(path)
    return files


def _register(settings: Any, files: list[Path]) -> None:
    import registry
    from bases import load_base

    base = load_base(settings.base_dir, check_forward_ad=False)
    reg = registry.open_registry(
        registry_dir=None if settings.redis_url else settings.registry_dir,
        redis_url=settings.redis_url, base_fingerprint=base.fingerprint, region=base.region,
        max_component_bytes=settings.max_component_bytes, cache_dir=settings.blob_cache_dir)
    try:
        known = {c.id for c in reg.list()}
        for path in files:
            cid = path.name.removesuffix(".safetensors")
            if cid not in known:
                reg.add(cid, path.read_bytes(), 1.0, ["example", "bbc"], True)
    finally:
        reg.close()


def _print_welcome(host: str, port: int, token: str, base_dir: Path) -> None:
    url = f"http://{host}:{port}"
    print(f"""
tmc is starting on {url}  (base: {base_dir}; docs: {url}/docs)
admin token: {token}
export TMC_ADMIN_TOKEN={token}

# 1. predict with a composition of two components (one forward + one JVP)
curl -s {url}/v1/predict -H 'content-type: application/json' \\
  -d '{{"inputs": ["The central bank raised interest rates again."],
       "components": {{"bbc-shard-0": 0.5, "bbc-shard-1": 0.5}}, "top_k": 2}}'

# 2. reweight a component (admin)
curl -s -X PATCH {url}/v1/components/bbc-shard-2 -H "authorization: Bearer $TMC_ADMIN_TOKEN" \\
  -H 'content-type: application/json' -d '{{"weight": 0.5}}'

# 3. forget a component exactly (admin): returns a receipt
curl -s -X DELETE {url}/v1/components/bbc-shard-2 -H "authorization: Bearer $TMC_ADMIN_TOKEN"
""", flush=True)


def _serve(settings: Any) -> int:
    import uvicorn

    from app.main import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1,
                log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(run_demo({}))
