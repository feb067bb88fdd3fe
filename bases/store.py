"""A base directory on disk: spec.json, theta0.safetensors, fingerprint, extra files.

``init_base`` writes one from a preset; ``load_base`` reads it back, verifies the
fingerprint (sha256 over the spec and every θ0 tensor) and the extra files' digests,
and returns a ready Base (network, tangent region, preprocessor).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bases.contracts import Preprocessor
from bases.errors import BaseNotFoundError, BaseSpecError, TamperedBaseError
from bases.presets import DEFAULT_LABELS, get_preset
from bases.spec import BaseSpec, JSONValue, Options
from tangent import LinearizedNet, TangentParam, fingerprint

SPEC_FILE, WEIGHTS_FILE, FINGERPRINT_FILE = "spec.json", "theta0.safetensors", "fingerprint"


@dataclass
class Base:
    """θ0 ready to serve: spec, fingerprint, linearized network, input preprocessing."""

    spec: BaseSpec
    fingerprint: str
    net: LinearizedNet
    preprocessor: Preprocessor
    directory: Path

    @property
    def region(self) -> dict[str, TangentParam]:
        return self.net.region

    @property
    def labels(self) -> list[str]:
        return self.spec.labels


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_spec(preset: str, *, name: str | None = None, labels: list[str] | None = None,
              options: Mapping[str, JSONValue] | None = None, tangent: list[str] | None = None,
              head_seed: int = 0) -> BaseSpec:
    module = get_preset(preset)
    opts: Options = {**module.DEFAULT_OPTIONS, **(options or {})}
    chosen_labels = labels or DEFAULT_LABELS.get(preset)
    if not chosen_labels or len(set(chosen_labels)) != len(chosen_labels):
        raise BaseSpecError("labels must be a non-empty list of distinct names")
    try:
        patterns = tangent or module.default_tangent(opts)
    except ValueError as exc:
        raise BaseSpecError(str(exc)) from exc
    files = {n: _sha256_file(p) for n, p in module.extra_files(opts).items()}
    return BaseSpec(name or preset, preset, module.INPUT_KIND, list(chosen_labels),
                    list(patterns), head_seed, opts, files)


def init_base(out_dir: Path, spec: BaseSpec, *, force: bool = False) -> str:
    """Materialize θ0 for spec into out_dir; return the fingerprint."""
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise BaseSpecError(f"{out_dir} is not empty; pass --force to overwrite")
    module = get_preset(spec.preset)
    net = module.build(spec)
    module.init_weights(spec, net)
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    try:
        LinearizedNet(net, spec.tangent)  # fail now if the patterns match nothing
    except ValueError as exc:
        raise BaseSpecError(str(exc)) from exc
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, src in module.extra_files(spec.options).items():
        shutil.copyfile(src, tmp / name)
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    (tmp / SPEC_FILE).write_bytes(spec.to_json())
    fp = fingerprint(spec.to_json(), tensors)
    (tmp / FINGERPRINT_FILE).write_text(fp + "\n")
    for path in tmp.iterdir():  # readable by the serving user, whoever wrote the base
        path.chmod(0o644)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return fp


def read_spec(base_dir: Path) -> BaseSpec:
    path = base_dir / SPEC_FILE
    if not path.is_file():
        raise BaseNotFoundError(f"no base at {base_dir} (missing {SPEC_FILE}); "
                                "create one with `tmc base init`")
    try:
        return BaseSpec.from_json(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise TamperedBaseError(f"{path} is not a valid base spec: {exc}") from exc


def load_base(base_dir: Path, *, check_forward_ad: bool = True) -> Base:
    """Load and verify a base directory; refuse a tampered one."""
    spec = read_spec(base_dir)
    try:
        tensors = load_file(str(base_dir / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise TamperedBaseError(f"cannot read {base_dir / WEIGHTS_FILE}: {exc}") from exc
    fp = _verify(base_dir, spec, tensors)
    module = get_preset(spec.preset)
    net = module.build(spec)
    net.load_state_dict(tensors, strict=True)
    linear = LinearizedNet(net, spec.tangent)
    pre = module.preprocessor(spec, base_dir)
    if check_forward_ad:
        linear.check_forward_ad(pre.example())
    return Base(spec, fp, linear, pre, base_dir)


def _verify(base_dir: Path, spec: BaseSpec, tensors: dict[str, torch.Tensor]) -> str:
    fp = fingerprint(spec.to_json(), tensors)
    recorded = (base_dir / FINGERPRINT_FILE).read_text().strip() if (
        base_dir / FINGERPRINT_FILE).is_file() else ""
    if fp != recorded:
        raise TamperedBaseError(
            f"base at {base_dir} does not match its fingerprint (recorded {recorded[:16]}…, "
            f"contents give {fp[:16]}…): it was modified; re-create it with `tmc base init`")
    for name, digest in spec.files.items():
        path = base_dir / name
        if not path.is_file() or _sha256_file(path) != digest:
            raise TamperedBaseError(f"base file {path} is missing or modified")
    return fp
