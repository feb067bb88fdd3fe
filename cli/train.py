"""`tmc train`: train ONE component from a base directory and a data shard.

``run_train(args)`` runs the command (its flags: cli/train_args.py) and returns the exit
code: 0 ok, 2 bad usage or input (labels outside the base, empty shard, unknown data,
training diverged), 3 missing dataset, 4 base not found or tampered. Errors print one
``error: ...`` line on stderr, never a traceback. Progress goes to stderr; ``--json``
prints one JSON object on stdout.

The steps, in order: load the base; load, align and split the data; choose the shard
(--classes, --shard, or all) and cap it; the pool's whitening (--pool); fit; validation
accuracy; provenance; encode and write the file atomically. This module imports only the
standard library at import time; torch and the training package load when it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bases import Base
    from training.data import Dataset, Splits
    from training.nonlinear import NonlinearResult
    from training.prototypes import PoolWhitening
    from training.tangent_train import TangentResult

    Trained = TangentResult | NonlinearResult

DESCRIPTION = "`tmc train`: train ONE component from a base directory and a data shard."
TRAINER = "tmc.training/1"
DEFAULT_VAL_LIMIT = 2000


@dataclass(frozen=True)
class Shard:
    """The rows one component trains on, how they were chosen, and its validation rows."""

    rule: str  # "classes" | "shard" | "all"
    rows: Dataset
    spec: str  # "0,1" | "k/n" | "all": the metadata's shard
    val: Dataset
    tag: str  # in the default output file name


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


def _train(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    import torch

    from app.settings import default_base_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    base_path = Path(args.base) if args.base is not None else default_base_dir()
    base = _load_base(base_path)
    splits = _splits(args, base)
    shard = _choose_shard(args, base, splits)
    out = _out_path(args, shard.tag)
    pool, pool_meta = _pool(args, base, splits, progress)
    result = _fit(args, base, shard, progress, pool)
    val_acc = _val_accuracy(base, shard.val, result, progress)
    provenance = _provenance(args, base, shard, result, val_acc)
    provenance["wall_time_s"] = round(time.perf_counter() - started, 3)
    payload, file_format = _encode(base, result, provenance, pool_meta)
    _write(out, payload)
    return _summary(provenance, result, out, file_format, payload, base_path, base)


def _load_base(path: Path) -> Base:
    from bases import BaseError, load_base
    from tangent import TangentError
    from training.errors import BaseUnavailableError

    try:
        return load_base(path)
    except (BaseError, TangentError) as exc:
        raise BaseUnavailableError(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise BaseUnavailableError(f"cannot load the base at {path}: {exc}") from exc


def _splits(args: argparse.Namespace, base: Base) -> Splits:
    """--data read, checked against the base's inputs, labels aligned, split (seeded)."""
    from training import data as D
    from training.errors import EmptyShardError
    from training.features import InputEncoder

    pool, fixed_test = D.load_source(args.data, args.data_dir)
    InputEncoder(base).check(pool)
    pool = D.align_labels(pool, base.labels)
    splits = D.split_train_val_test(pool, test=fixed_test, val_fraction=args.val_fraction,
                                    test_fraction=args.test_fraction, seed=args.split_seed)
    if len(splits.train) == 0:
        raise EmptyShardError(f"{pool.source}: the training split is empty")
    return splits


def _choose_shard(args: argparse.Namespace, base: Base, splits: Splits) -> Shard:
    """--classes (class-incremental, validated on those classes only), --shard k/n
    (data-incremental) or the whole training split; then --limit and --val-limit."""
    import numpy as np

    from training import data as D

    if args.classes is not None:
        classes = D.parse_classes(args.classes, base.labels)
        val = splits.val.subset(np.flatnonzero(np.isin(splits.val.labels, classes)))
        shard = Shard("classes", D.shard_by_classes(splits.train, classes),
                      ",".join(str(c) for c in classes), val,
                      "classes-" + "-".join(str(c) for c in classes))
    elif args.shard is not None:
        k, n = D.parse_shard(args.shard)
        shard = Shard("shard", D.shard_random(splits.train, k, n, seed=args.split_seed),
                      f"{k}/{n}", splits.val, f"shard-{k}of{n}")
    else:
        shard = Shard("all", splits.train, "all", splits.val, "all")
    rows, val = shard.rows, shard.val
    if args.limit is not None:
        rows = D.take(rows, args.limit, seed=args.split_seed)
    if len(val) > args.val_limit:
        val = D.take(val, args.val_limit, seed=args.split_seed)
    return Shard(shard.rule, rows, shard.spec, val, shard.tag)


def _out_path(args: argparse.Namespace, tag: str) -> Path:
    from training.errors import UsageError

    out: Path = args.out or Path(f"{_data_name(args.data)}-{tag}"
                                 f"{'-nonlinear' if args.nonlinear else ''}.safetensors")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory")
    return out


def _pool(args: argparse.Namespace, base: Base, splits: Splits, progress: bool
          ) -> tuple[PoolWhitening | None, dict[str, Any]]:
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


def _fit(args: argparse.Namespace, base: Base, shard: Shard, progress: bool,
         pool: PoolWhitening | None) -> Trained:
    """Train the non-linear baseline (--nonlinear) or the tangent component Δ."""
    from training.nonlinear import NonlinearConfig, default_nonlinear_lr, train_nonlinear
    from training.tangent_train import default_lr

    lr = args.lr if args.lr is not None else (
        default_nonlinear_lr(base, shard.rule) if args.nonlinear
        else default_lr(base, shard.rule))
    common: dict[str, Any] = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay,
        lr_step=args.lr_step, seed=args.seed, cache=not args.no_cache)
    if args.nonlinear:
        return train_nonlinear(base, shard.rows, NonlinearConfig(**common), progress=progress,
                               desc="train (non-linear)")
    return _fit_tangent(args, base, shard, progress, pool, common)


def _fit_tangent(args: argparse.Namespace, base: Base, shard: Shard, progress: bool,
                 pool: PoolWhitening | None, common: dict[str, Any]) -> TangentResult:
    """Δ with the rule's recipe (training/README.md), the flags given overriding it."""
    from training.errors import UsageError
    from training.negatives import IMAGE_ONLY
    from training.tangent_train import (
        TangentConfig,
        default_kappa,
        default_recipe,
        train_tangent,
    )

    kappa = args.kappa if args.kappa is not None else default_kappa(shard.rule)
    recipe = default_recipe(shard.rule)
    if args.targets is not None:
        recipe["targets"] = args.targets
    if args.quiet_weight is not None:
        recipe["quiet"] = args.quiet_weight
    if args.negatives is not None:
        recipe["negatives"] = args.negatives
    if args.prototypes is not None:
        recipe["prototypes"] = args.prototypes
    if recipe["negatives"] in IMAGE_ONLY and base.spec.input_kind != "image":
        recipe["negatives"] = "mix"
    config = TangentConfig(kappa=kappa, l2=args.l2, **recipe, **common)
    if pool is not None and not config.prototypes:
        raise UsageError("--pool whitens the prototypes: give --prototypes > 0 with it")
    return train_tangent(base, shard.rows, config, pool=pool, progress=progress,
                         desc="train")


def _val_accuracy(base: Base, val: Dataset, result: Trained, progress: bool) -> float | None:
    """This component alone on the validation rows (None without any)."""
    from training.evaluate import Evaluator
    from training.nonlinear import NonlinearResult

    if not len(val):
        return None
    ev = Evaluator(base, val, progress=progress, desc="validation")
    if isinstance(result, NonlinearResult):
        return ev.nonlinear(result.params)
    return ev.tangent(result.delta)


def _provenance(args: argparse.Namespace, base: Base, shard: Shard, result: Trained,
                val_acc: float | None) -> dict[str, Any]:
    """What the file's metadata records about how it was made (wall time added last)."""
    return {
        "trainer": TRAINER,
        "kind": "nonlinear" if args.nonlinear else "tangent",
        "data_source": shard.rows.source,
        "data": args.data,
        "shard_rule": shard.rule,
        "shard": shard.spec,
        "split_seed": args.split_seed,
        "val_fraction": args.val_fraction,
        "classes": shard.rows.classes_present(),
        "samples": len(shard.rows),
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
        "val_samples": len(shard.val),
        "base_name": base.spec.name,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _encode(base: Base, result: Trained, provenance: dict[str, Any],
            pool_meta: dict[str, Any]) -> tuple[bytes, str]:
    """The file's bytes and format: tmc.nonlinear/1, or a tangent component whose metadata
    adds its recipe and pool (``provenance`` is updated with them)."""
    from training.nonlinear import FORMAT, NonlinearResult, encode_nonlinear

    if isinstance(result, NonlinearResult):
        return encode_nonlinear(result.params, base.fingerprint, provenance), FORMAT
    from tangent import FORMAT as COMPONENT_FORMAT
    from tangent import encode_component

    cfg = result.config
    provenance.update(kappa=cfg.kappa, l2=cfg.l2, targets=cfg.targets, quiet=cfg.quiet,
                      negatives=cfg.negatives if cfg.quiet else None,
                      prototypes=cfg.prototypes, **pool_meta)
    return encode_component(result.delta, base.fingerprint, provenance), COMPONENT_FORMAT


def _summary(provenance: dict[str, Any], result: Trained, out: Path, file_format: str,
             payload: bytes, base_path: Path, base: Base) -> dict[str, Any]:
    """What `tmc train --json` prints: the provenance, the file, and the fit's figures."""
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
