"""`tmc train`: train ONE component from a base directory and a data shard.

``add_train_parser(subparsers)`` registers the command, ``run_train(args)`` runs it and
returns the exit code: 0 ok, 2 bad usage or input (labels outside the base, empty shard,
unknown data, training diverged), 3 missing dataset, 4 base not found or tampered. Errors
print one ``error: ...`` line on stderr, never a traceback. Progress goes to stderr;
``--json`` prints one JSON object on stdout.

This module imports only the standard library at import time (the `tmc` CLI builds every
sub-parser on each call); torch and the rest load when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TRAINER = "tmc.training/1"
DEFAULT_VAL_LIMIT = 2000


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


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `train` on an argparse sub-parser collection; return its parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train", help="train one tangent component (or a non-linear baseline) on a data shard",
        description=__doc__.split("\n\n")[0] + " Writes a component file (safetensors, "
        "format tmc.component/1) whose metadata records the provenance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="AdamW learning rate (default: with --classes 1e-4; otherwise 1e-3 "
                   "for a tangent region of <= 2M parameters, else 1e-4; --nonlinear: 3e-4 "
                   "with --classes, else as the tangent default)")
    p.add_argument("--kappa", type=_positive_float, default=None,
                   help="target scale κ of the rescaled square loss (default: 300 with "
                   "--classes, 5 otherwise)")
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
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Run `tmc train`; return the exit code (errors: one line on stderr)."""
    from training.errors import TrainingError

    try:
        summary = _train(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        _print_summary(summary)
    return 0


def base_dir_from(args: argparse.Namespace) -> Path:
    if args.base is not None:
        return Path(args.base)
    if os.environ.get("TMC_BASE_DIR"):
        return Path(os.environ["TMC_BASE_DIR"])
    return Path(os.environ.get("TMC_HOME", ".tmc")) / "base"


def _load_base(path: Path) -> Any:
    from bases import BaseError, load_base
    from tangent import TangentError
    from training.errors import BaseUnavailableError

    try:
        return load_base(path)
    except (BaseError, TangentError) as exc:
        raise BaseUnavailableError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise BaseUnavailableError(f"cannot load the base at {path}: {exc}") from exc


def _train(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import numpy as np
    import torch

    from training import data as D
    from training.errors import EmptyShardError, UsageError
    from training.evaluate import Evaluator
    from training.features import InputEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    base_path = base_dir_from(args)
    base = _load_base(base_path)
    pool, fixed_test = D.load_source(args.data, args.data_dir)
    InputEncoder(base).check(pool)
    pool = D.align_labels(pool, base.labels)
    splits = D.split_train_val_test(pool, test=fixed_test, val_fraction=args.val_fraction,
                                    test_fraction=args.test_fraction, seed=args.split_seed)
    if len(splits.train) == 0:
        raise EmptyShardError(f"{pool.source}: the training split is empty")
    if args.classes is not None:
        rule = "classes"
        classes = D.parse_classes(args.classes, base.labels)
        shard = D.shard_by_classes(splits.train, classes)
        shard_spec = ",".join(str(c) for c in classes)
        val = splits.val.subset(np.flatnonzero(np.isin(splits.val.labels, classes)))
        tag = "classes-" + "-".join(str(c) for c in classes)
    elif args.shard is not None:
        rule = "shard"
        k, n = D.parse_shard(args.shard)
        shard = D.shard_random(splits.train, k, n, seed=args.split_seed)
        shard_spec, val, tag = f"{k}/{n}", splits.val, f"shard-{k}of{n}"
    else:
        rule, shard, shard_spec, val, tag = "all", splits.train, "all", splits.val, "all"
    if args.limit is not None:
        shard = D.take(shard, args.limit, seed=args.split_seed)
    if len(val) > args.val_limit:
        val = D.take(val, args.val_limit, seed=args.split_seed)
    out = args.out or Path(f"{_data_name(args.data)}-{tag}"
                           f"{'-nonlinear' if args.nonlinear else ''}.safetensors")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory")

    pool, pool_meta = _pool(args, base, splits, progress)
    result, kind = _fit(args, base, shard, rule, progress, pool)
    val_acc = None
    if len(val):
        ev = Evaluator(base, val, progress=progress, desc="validation")
        val_acc = ev.nonlinear(result.params) if args.nonlinear else ev.tangent(result.delta)
    wall = time.perf_counter() - started
    provenance: dict[str, Any] = {
        "trainer": TRAINER,
        "kind": kind,
        "data_source": shard.source,
        "data": args.data,
        "shard_rule": rule,
        "shard": shard_spec,
        "split_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "classes": shard.classes_present(),
        "samples": len(shard),
        "limit": args.limit,
        "loss": "cross_entropy" if args.nonlinear else "rescaled_square",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": result.config.lr,
        "weight_decay": args.weight_decay,
        "lr_step": args.lr_step,
        "seed": args.seed,
        "trunk_cached": not args.no_cache,
        "final_loss": result.epoch_losses[-1],
        "val_accuracy": val_acc,
        "val_samples": len(val),
        "base_name": base.spec.name,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_time_s": round(wall, 3),
    }
    if not args.nonlinear:
        cfg = result.config
        provenance.update(kappa=cfg.kappa, l2=args.l2, targets=cfg.targets, quiet=cfg.quiet,
                          negatives=cfg.negatives if cfg.quiet else None,
                          prototypes=cfg.prototypes, **pool_meta)
    if args.nonlinear:
        from training.nonlinear import FORMAT, encode_nonlinear

        payload = encode_nonlinear(result.params, base.fingerprint, provenance)
        file_format = FORMAT
    else:
        from tangent import FORMAT as COMPONENT_FORMAT
        from tangent import encode_component

        payload = encode_component(result.delta, base.fingerprint, provenance)
        file_format = COMPONENT_FORMAT
    _write(out, payload)
    return {
        **provenance,
        "ok": True,
        "out": str(out),
        "format": file_format,
        "digest": hashlib.sha256(payload).hexdigest(),
        "bytes": len(payload),
        "base_dir": str(base_path),
        "base_fingerprint": base.fingerprint,
        "initial_loss": result.initial_loss,
        "epoch_losses": result.epoch_losses,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 3),
        "trunk_seconds": round(result.trunk_seconds, 3),
        "rows_per_s": round(result.rows_per_s, 1),
    }


def _pool(args: argparse.Namespace, base: Any, splits: Any, progress: bool
          ) -> tuple[Any, dict[str, Any]]:
    """The pool's whitening statistics and its provenance (None, {} without --pool)."""
    if args.pool is None:
        return None, {}
    from training import data as D
    from training.errors import UsageError
    from training.features import InputEncoder, trunk_features
    from training.prototypes import dataset_fingerprint, pool_whitening

    if args.nonlinear:
        raise UsageError("--pool is for tangent components (prototypes), not --nonlinear")
    if args.pool == args.data and args.pool_dir in (None, args.data_dir):
        rows = splits.train  # never the validation or test rows
    else:
        rows, _ = D.load_source(args.pool, args.pool_dir)
    InputEncoder(base).check(rows)
    rows = D.take(rows, args.pool_limit, seed=args.split_seed + 1)
    feats = trunk_features(base, rows, progress=progress, desc="pool features")
    meta = {"pool": args.pool, "pool_rows": len(rows), "pool_shrinkage": args.shrinkage,
            "pool_fingerprint": dataset_fingerprint(rows)}
    return pool_whitening(base.net, feats, args.shrinkage), meta


def _fit(args: argparse.Namespace, base: Any, shard: Any, rule: str, progress: bool,
         pool: Any = None) -> tuple[Any, str]:
    from training.negatives import IMAGE_ONLY
    from training.nonlinear import NonlinearConfig, default_nonlinear_lr, train_nonlinear
    from training.tangent_train import (
        TangentConfig,
        default_kappa,
        default_lr,
        default_recipe,
        train_tangent,
    )

    lr = args.lr if args.lr is not None else (
        default_nonlinear_lr(base, rule) if args.nonlinear else default_lr(base, rule))
    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                  weight_decay=args.weight_decay, lr_step=args.lr_step, seed=args.seed,
                  cache=not args.no_cache)
    if args.nonlinear:
        return train_nonlinear(base, shard, NonlinearConfig(**common), progress=progress,
                               desc="train (non-linear)"), "nonlinear"
    kappa = args.kappa if args.kappa is not None else default_kappa(rule)
    recipe = default_recipe(rule)
    given = {"targets": args.targets, "quiet": args.quiet_weight,
             "negatives": args.negatives, "prototypes": args.prototypes}
    recipe.update({k: v for k, v in given.items() if v is not None})
    if recipe["negatives"] in IMAGE_ONLY and base.spec.input_kind != "image":
        recipe["negatives"] = "mix"
    config = TangentConfig(kappa=kappa, l2=args.l2, **recipe, **common)
    if pool is not None and not config.prototypes:
        from training.errors import UsageError

        raise UsageError("--pool whitens the prototypes: give --prototypes > 0 with it")
    return train_tangent(base, shard, config, pool=pool, progress=progress,
                         desc="train"), "tangent"


def _data_name(data: str) -> str:
    kind, _, arg = data.partition(":")
    return Path(arg.rstrip("/")).stem or kind if arg else kind


def _write(out: Path, payload: bytes) -> None:
    from training.errors import UsageError

    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(payload)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from exc


def _print_summary(s: dict[str, Any]) -> None:
    val = "n/a" if s["val_accuracy"] is None else f"{s['val_accuracy']:.4f}"
    losses = s["epoch_losses"]
    print(f"wrote {s['out']} ({s['format']}, {s['bytes']} bytes, sha256 {s['digest'][:16]}…)")
    print(f"  data {s['data_source']}  rule {s['shard_rule']} {s['shard']}  "
          f"classes {', '.join(s['classes'])}  samples {s['samples']}")
    extra = f" κ={s['kappa']}" if "kappa" in s else ""
    print(f"  {s['loss']}{extra}  epochs {s['epochs']}  lr {s['lr']:g}  seed {s['seed']}  "
          f"loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    print(f"  validation accuracy (this component alone, {s['val_samples']} rows): {val}")
    print(f"  time: train {s['train_seconds']:.1f}s (trunk features {s['trunk_seconds']:.1f}s), "
          f"wall {s['wall_time_s']:.1f}s, {s['rows_per_s']:.0f} rows/s")
