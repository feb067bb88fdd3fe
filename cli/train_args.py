"""The `tmc train` flags: argparse value types and ``add_train_parser``.

Only the standard library is imported here (the `tmc` command builds every sub-parser on
each call); the command itself is cli/train.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import Subparsers
from cli.train import DEFAULT_VAL_LIMIT, DESCRIPTION, run_train


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _shrinkage(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within (0, 1], got {value}")
    return value


def _fraction(text: str) -> float:
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1), got {value}")
    return value


def _float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_train_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Register `train` on an argparse sub-parser collection; return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train", help="train one tangent component (or a non-linear baseline) on a data shard",
        description=DESCRIPTION + " Writes a component file (safetensors, "
        "format tmc.component/1) whose metadata records the provenance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_flags(p)
    _add_fit_flags(p)
    _add_recipe_flags(p)
    _add_run_flags(p)
    p.set_defaults(func=run_train)
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """Which base, which data, which shard of it."""
    p.add_argument("--base", type=Path, default=None,
                   help="base directory (default: $TMC_BASE_DIR, else $TMC_HOME/base, "
                   "else .tmc/base)")
    p.add_argument("--data", required=True,
                   help="fashion-mnist | bbc | digits | digits-images | imagefolder:PATH | "
                   "jsonl:PATH | csv:PATH (text,label columns)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where fashion-mnist's idx files are (default "
                   "/usr/share/datasets/fashion-mnist) or bbc's class folders")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--classes", help="class-incremental shard: label names or indices, "
                      "e.g. 0,1 or trouser,bag")
    rule.add_argument("--shard", help="data-incremental shard k/n of the training split "
                      "(k counts from 0: 0/5 .. 4/5)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the fixed train/val/test split and of the k/n shards")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="validation split, carved from the training data")
    p.add_argument("--test-fraction", type=_fraction, default=0.2,
                   help="held-out test split, for sources without their own test set")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="cap the training rows of the shard (seeded random subset)")
    p.add_argument("--val-limit", type=_positive_int, default=DEFAULT_VAL_LIMIT,
                   help="cap the validation rows used for the final accuracy")


def _add_fit_flags(p: argparse.ArgumentParser) -> None:
    """Epochs, batch size, learning rate and the loss scale κ."""
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="AdamW learning rate (default: with --classes 1e-4; otherwise 1e-3 "
                   "for a tangent region of <= 2M parameters, else 1e-4; --nonlinear: 3e-4 "
                   "with --classes, else as the tangent default)")
    p.add_argument("--kappa", type=_positive_float, default=None,
                   help="target scale κ of the rescaled square loss (default: 300 with "
                   "--classes, 5 otherwise)")


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """The tangent recipe: loss terms, targets, quieting, prototypes and their pool."""
    p.add_argument("--l2", type=_nonneg_float, default=1e-5, help="weight of ‖Δ‖₂")
    p.add_argument("--targets", choices=("all", "own"), default=None,
                   help="square-loss targets: κ·one-hot on every output (all), or on the "
                   "shard's own classes with J·Δ = 0 on the other outputs (own) (default: by "
                   "rule, see training/README.md)")
    p.add_argument("--quieting", type=_nonneg_float, default=None, dest="quiet_weight",
                   metavar="W",
                   help="weight of mean ‖J(x̃)·Δ‖² over off-distribution inputs x̃ made from "
                   "the shard's own rows (--negatives); 0 turns it off (default: by rule)")
    p.add_argument("--negatives", choices=("rot", "jigsaw", "mix", "rot+jigsaw"),
                   default=None, help="how --quieting's inputs are made from the shard's rows: "
                   "rotated, tile-shuffled or blended images (text and vectors: mix) "
                   "(default: by rule)")
    p.add_argument("--prototypes", type=_nonneg_float, default=None, metavar="P",
                   help="p: add p·κ·(unit mean of the output layer's inputs over each own "
                   "class) to that class's output row of Δ (nearest-class-mean term; with "
                   "--pool, whitened by the pool's covariance); 0 turns it off (default: by "
                   "rule)")
    p.add_argument("--pool", default=None, metavar="DATA",
                   help="unlabeled pool that whitens the prototypes: a --data value whose "
                   "labels are ignored (the same value as --data: its training split); "
                   "fixed with the base, the same rows for every component; its "
                   "fingerprint goes into the metadata")
    p.add_argument("--pool-dir", type=Path, default=None, help="--data-dir of the pool")
    p.add_argument("--pool-limit", type=_positive_int, default=2000,
                   help="rows of the pool (a subset fixed by --split-seed)")
    p.add_argument("--shrinkage", type=_shrinkage, default=0.3,
                   help="shrinkage of the pool covariance towards a multiple of the identity")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Weight decay and its schedule, seed, caching, the baseline switch, threads, output."""
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.01,
                   help="AdamW decoupled weight decay")
    p.add_argument("--lr-step", type=_positive_int, default=None,
                   help="epochs between learning-rate decays (×0.1; default: one decay "
                   "after 70%% of the epochs)")
    p.add_argument("--seed", type=int, default=0, help="training seed (batch order)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the frozen trunk every step instead of caching its outputs")
    p.add_argument("--nonlinear", action="store_true",
                   help="train the non-linear baseline (ordinary fine-tuning of the same "
                   "region, cross-entropy) and write a tmc.nonlinear/1 file")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: ./<data>-<shard>[-nonlinear].safetensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
