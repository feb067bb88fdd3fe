"""`make run`: the embedded default, ready to try.

Preset: effnet-lite0 (EfficientNet-Lite0 ImageNet weights, Fashion-MNIST labels, tangent
region = conv head + BatchNorm + classifier, 425k parameters). Chosen because its
components train in seconds on 2 cores with the trunk cached, so the first run is ready in
about a minute; MiniLM's tangent layer costs seconds per 32-document step on 2 cores.

First run: create the base, train three example components on disjoint Fashion-MNIST
shards (data-incremental), register them in the embedded registry, write a few test-set
images as PNG files to try, then serve. Later runs reuse everything under $TMC_HOME.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.service import Service
    from app.settings import Settings
    from registry import Registry

EXAMPLES = 3
EXAMPLE_SAMPLES = 2000  # per component
EXAMPLE_EPOCHS = 6
SAMPLE_IMAGES = {"ankle-boot": 9, "trouser": 1, "bag": 8, "shirt": 6}  # name -> class index


def run_demo(overrides: dict[str, str | int]) -> int:
    from app.settings import load_settings, tmc_home
    from cli.serve import open_service

    home = tmc_home()
    token = os.environ.get("TMC_ADMIN_TOKEN") or _stored_token(home)
    settings = load_settings(admin_token=token, **overrides)
    _ensure_base(settings.base_dir)
    files = _ensure_examples(settings.base_dir, home / "examples")
    _write_sample_images(home / "examples")
    service = open_service(settings)  # base and registry opened once: registered, served
    _register(service.registry, files)
    _print_welcome(settings.host, settings.port, token, home / "examples")
    return _serve(settings, service)


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
    print(f"creating the effnet-lite0 base in {base_dir} …", flush=True)
    init_base(base_dir, make_spec("effnet-lite0", name="effnet-fmnist"))


def _ensure_examples(base_dir: Path, out_dir: Path) -> list[Path]:
    from cli.main import main as tmc

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(EXAMPLES):
        path = out_dir / f"fmnist-shard-{k}.safetensors"
        if not path.is_file():
            print(f"training example component {k + 1}/{EXAMPLES} (Fashion-MNIST shard "
                  f"{k}/{EXAMPLES}, {EXAMPLE_SAMPLES} images) …", flush=True)
            code = tmc(["train", "--base", str(base_dir), "--data", "fashion-mnist",
                        "--shard", f"{k}/{EXAMPLES}", "--limit", str(EXAMPLE_SAMPLES),
                        "--epochs", str(EXAMPLE_EPOCHS), "--out", str(path)])
            if code != 0:
                raise SystemExit(code)
        files.append(path)
    return files


def _write_sample_images(out_dir: Path) -> None:
    """A few Fashion-MNIST test images as PNG files, for the curl examples."""
    import numpy as np
    from PIL import Image

    from training.data import load_fashion_mnist

    if all((out_dir / f"{n}.png").is_file() for n in SAMPLE_IMAGES):
        return
    _, test = load_fashion_mnist()
    images = np.asarray(test.inputs)  # (N, 28, 28) uint8
    for name, label in SAMPLE_IMAGES.items():
        row = int(np.flatnonzero(test.labels == label)[0])
        Image.fromarray(images[row]).save(out_dir / f"{name}.png")


def _register(reg: Registry, files: list[Path]) -> None:
    """The example components not yet in the registry (the service's own: it stays open)."""
    known = {c.id for c in reg.list()}
    for path in files:
        cid = path.name.removesuffix(".safetensors")
        if cid not in known:
            reg.add(cid, path.read_bytes(), 1.0, ["example", "fashion-mnist"], True)


def _print_welcome(host: str, port: int, token: str, examples: Path) -> None:
    url = f"http://{host}:{port}"
    print(f"""
tmc is starting on {url}  (docs: {url}/docs)
admin token: {token}
export TMC_ADMIN_TOKEN={token}

# 1. predict with a composition of two components (one forward + one JVP)
curl -s {url}/v1/predict -H 'content-type: application/json' -d '{{
  "inputs": ["'$(base64 -w0 {examples}/ankle-boot.png)'"],
  "components": {{"fmnist-shard-0": 0.5, "fmnist-shard-1": 0.5}}, "top_k": 2}}'

# 2. reweight a component (admin)
curl -s -X PATCH {url}/v1/components/fmnist-shard-2 -H "authorization: Bearer $TMC_ADMIN_TOKEN" \\
  -H 'content-type: application/json' -d '{{"weight": 0.5}}'

# 3. forget a component exactly (admin): returns a receipt
curl -s -X DELETE {url}/v1/components/fmnist-shard-2 -H "authorization: Bearer $TMC_ADMIN_TOKEN"
""", flush=True)


def _serve(settings: Settings, service: Service) -> int:
    """The same server as `tmc serve` (its slow-client limits and drain included)."""
    from cli.serve import run_server

    return run_server(settings, service)


if __name__ == "__main__":
    sys.exit(run_demo({}))
