"""Reproduction benchmark: TMC against the paper's baselines, end to end, on this machine.

    python -m bench.accuracy --all | --experiment NAME [--quick] [--seeds 0,1,2] [--select]

fmnist-class-il: effnet-lite0 (tangent region R2: conv head + BN + classifier), Fashion-MNIST
    at 64×64, 5 class-incremental tasks of 2 classes, 2,000 training images per task.
fmnist-data-il / fmnist-data-il-10: the same base, one pool of 10,000 training images cut at
    random into 5 / 10 data-incremental shards.
bbc-data-il: minilm (last encoder layer + classifier), BBC News, 5 data-incremental shards of
    the training split.

For each seed (default 3): accuracy on the full held-out test split of each component alone,
the TMC mean composition, the non-linear (NL) ensemble (mean of softmax), the NL weight
average, joint tangent training on all the tasks' data, the linear probe, and θ0; the
continual curve (compositions of the first k components as tasks arrive one by one; TMC's
prefixes from the components' logits by linearity); on the first seed, the forgetting check
through a real registry (forget one component, compare with a registry that never had it).
On the validation split only what is chosen there is scored (TMC's normalization, the
non-linear combination). Mean ± spread over seeds, targets, training times, settings.
Trunk features are computed once per split and shared by every method and seed.
``--select`` instead sweeps κ / learning rates on the validation split (carved from the
training data; the test split is never looked at) and writes ``*_select.json``.
Results: bench/results/accuracy_<experiment>[_select|_quick].json, accuracy[_quick].png
(continual curves) and accuracy_forgetting[_quick].png.
"""
# ruff: noqa: E402

from __future__ import annotations

import os

# Shared 2-core machines: spinning OpenMP workers collapse throughput when other processes
# compete for the cores (measured here: 2 threads 10x slower than 1 under load). Passive
# waiting costs little when the machine is idle. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.accuracy_data import Prepared, Task, prepare
from bench.accuracy_experiments import DEFAULT_RUN, DEFAULT_SEEDS, EXPERIMENTS, Experiment
from bench.accuracy_report import (
    accuracy_targets,
    aggregate_accuracy,
    aggregate_continual,
)
from bench.accuracy_training import (
    best_probe,
    joint_tangent,
    tangent_config,
    train_components,
    train_nl_components,
)
from bench.common import log, machine
from training.nonlinear import NonlinearConfig, default_nonlinear_lr
from training.probe import train_linear_probe
from training.protocols import (
    continual_curve,
    forgetting_check,
    method_scores,
    summarize_scores,
)
from training.prototypes import PoolWhitening, add_prototypes
from training.tangent_train import (
    TangentConfig,
    default_kappa,
    default_lr,
    default_recipe,
)

RESULTS = Path(__file__).resolve().parent / "results"


def run(exp: Experiment, seeds: Sequence[int], progress: bool, forgetting: bool = True
        ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tmc-bench-") as tmp:
        p = prepare(exp, Path(tmp) / "base", progress)
        cfg = tangent_config(p)
        nl_cfg = NonlinearConfig(epochs=exp.epochs,
                                 lr=exp.nl_lr or default_nonlinear_lr(p.base, exp.rule))
        joint_cfg = replace(cfg, kappa=default_kappa("all"), lr=default_lr(p.base, "all"),
                            **default_recipe("all"))
        probe, probe_val, probe_s = best_probe(p)
        per_seed = []
        for i, seed in enumerate(seeds):
            log(f"== {exp.name} seed {seed} ({i + 1}/{len(seeds)}): tangent kappa={cfg.kappa} "
                f"lr={cfg.lr}, NL lr={nl_cfg.lr}, epochs={cfg.epochs}")
            joint = exp.joint_seeds is None or i < exp.joint_seeds
            per_seed.append(run_seed(p, seed, replace(cfg, seed=seed),
                                     replace(nl_cfg, seed=seed),
                                     replace(joint_cfg, seed=seed) if joint else None,
                                     probe, progress,
                                     Path(tmp) / f"forget-{seed}" if forgetting and i == 0
                                     else None))
        forget_result = per_seed[0].pop("forgetting", None)
        return {
            "experiment": exp.name,
            "seeds": list(seeds),
            "settings": {
                "experiment": {k: v for k, v in exp.__dict__.items()},
                "tangent": cfg.as_dict(), "nonlinear": nl_cfg.as_dict(),
                "joint_tangent": joint_cfg.as_dict(), "linear_probe_l2": probe.l2,
                "linear_probe_val_by_l2": probe_val,
                "joint_tangent_seeds": (f"first {exp.joint_seeds}" if exp.joint_seeds
                                        else "all") + " (a cached joint Δ is reused when "
                                        "base, rows, settings and seed are the same)",
                "seeds_vary": ("training randomness (minibatch order; seed·1000+task per "
                               "component)" + ("" if exp.rule == "classes" else
                                               " and the assignment of pool rows to shards")
                               + "; training pool, validation and test rows are fixed"),
                "base_spec": json.loads(p.base.spec.to_json()),
                "base_fingerprint": p.base.fingerprint,
                "tangent_region_params": sum(int(np.prod(t.shape))
                                             for t in p.base.region.values()),
                "pool_rows": len(p.union),
            },
            "per_seed": per_seed,
            "accuracy": aggregate_accuracy(per_seed),
            "continual": aggregate_continual(per_seed),
            "forgetting": forget_result,
            "targets": accuracy_targets(exp, per_seed, forget_result),
            "train_seconds": {"linear_probe_each_l2": probe_s,
                              **{f"{k}_features": v for k, v in p.seconds.items()}},
            "machine": machine(),
        }


def with_prototypes(p: Prepared, tasks: list[Task], plain: list[dict[str, torch.Tensor]],
                    cfg: TangentConfig, pool: PoolWhitening | None
                    ) -> list[dict[str, torch.Tensor]]:
    """The components with cfg's prototype term (p·κ, cosine or pool-whitened) added."""
    if not cfg.prototypes:
        return plain
    return [add_prototypes(d, p.base.net, ds, feats, cfg.prototypes * cfg.kappa, pool)
            for (_, ds, feats), d in zip(tasks, plain, strict=True)]


def prototype_variants(p: Prepared, tasks: list[Task], plain: list[dict[str, torch.Tensor]],
                       cfg: TangentConfig) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Side-by-side compositions: without prototypes (the pre-issue-16 recipe) and with
    pool-whitened prototypes (when the experiment has an unlabeled pool)."""
    out = {}
    if cfg.prototypes:
        out["tmc_no_prototypes"] = plain
    if cfg.prototypes and p.pool is not None:
        out["tmc_pool_prototypes"] = with_prototypes(p, tasks, plain, cfg, p.pool)
    return out


def run_seed(p: Prepared, seed: int, cfg: TangentConfig, nl_cfg: NonlinearConfig,
             joint_cfg: TangentConfig | None, probe: Any, progress: bool,
             forget_dir: Path | None) -> dict[str, Any]:
    tasks = p.tasks_for(seed)
    # the tangent part is trained once; the prototype term is added after training (exactly
    # what train_tangent does), so the components without it are scored side by side
    comps = train_components(p, tasks, replace(cfg, prototypes=0.0), progress)
    nls = train_nl_components(p, tasks, nl_cfg, progress)
    joint = joint_tangent(p, joint_cfg, progress) if joint_cfg is not None else None
    log("  evaluating")
    plain = [r.delta for _, r in comps]
    deltas = with_prototypes(p, tasks, plain, cfg, None)
    variants = prototype_variants(p, tasks, plain, cfg)
    models = [r.params for _, r in nls]
    labels = [lab for lab, _ in comps]
    t = time.perf_counter()
    # validation: only what is chosen there (TMC normalization, NL combination)
    scores = {split: method_scores(ev, deltas, models, joint.delta if joint else None, probe,
                                   selection_only=split == "val", variants=variants)
              for split, ev in (("test", p.test), ("val", p.val))}
    accuracy = {split: summarize_scores(ev, s, labels)
                for (split, s), ev in zip(scores.items(), (p.test, p.val), strict=True)}
    classes = p.task_classes(tasks)
    out: dict[str, Any] = {
        "seed": seed,
        "rows_per_task": {lab: len(ds) for lab, ds, _ in tasks},
        "accuracy": accuracy,
        "continual": continual_curve(p.test, deltas, models, scores["test"], classes),
        "train_seconds": {
            "tangent_per_component": {lab: r.train_seconds for lab, r in comps},
            "nonlinear_per_component": {lab: r.train_seconds for lab, r in nls},
            "joint_tangent": joint.train_seconds if joint else None,
            "joint_tangent_reused": joint.reused if joint else None},
        "losses": {"tangent": {lab: r.epoch_losses for lab, r in comps},
                   "nonlinear": {lab: r.epoch_losses for lab, r in nls},
                   "joint_tangent": joint.epoch_losses if joint else None},
    }
    if forget_dir is not None:
        out["forgetting"] = forgetting_check(p.base, tasks, deltas, p.test, classes, forget_dir)
    out["eval_seconds"] = time.perf_counter() - t
    log(f"  seed {seed}: test TMC {accuracy['test']['tmc_mean']:.4f}, NL ensemble "
        f"{accuracy['test']['nl_ensemble_softmax']:.4f}, joint "
        f"{accuracy['test'].get('joint_tangent', float('nan')):.4f}")
    return out


def select(exp: Experiment, progress: bool) -> dict[str, Any]:
    """Sweep κ and learning rates; score on the validation split only."""
    with tempfile.TemporaryDirectory(prefix="tmc-bench-") as tmp:
        p = prepare(exp, Path(tmp) / "base", progress)
        tasks = p.tasks_for(exp.seed)
        grid: list[dict[str, Any]] = []
        for kappa, lr in exp.tmc_grid:
            log(f"select: tangent kappa={kappa} lr={lr}")
            cfg = tangent_config(p, kappa=kappa, lr=lr)
            comps = train_components(p, tasks, cfg, progress)
            deltas = [r.delta for _, r in comps]
            grid.append({"method": "tmc", "kappa": kappa, "lr": lr,
                         "val_tmc_mean": p.val.tmc(deltas),
                         "val_alone": [p.val.tangent(d) for d in deltas],
                         "seconds": [r.train_seconds for _, r in comps]})
            log(f"  -> val TMC {grid[-1]['val_tmc_mean']:.4f}")
            _checkpoint(exp, grid)
        for options in exp.recipe_grid:
            grid.append(select_recipe(p, tasks, options, progress))
            _checkpoint(exp, grid)
        for lr in exp.nl_grid:
            log(f"select: non-linear lr={lr}")
            nls = train_nl_components(p, tasks, NonlinearConfig(epochs=exp.epochs, lr=lr),
                                      progress)
            models = [r.params for _, r in nls]
            grid.append({"method": "nonlinear", "lr": lr,
                         "val_ensemble_softmax": p.val.ensemble(models, "softmax"),
                         "val_weight_average": p.val.weight_average(models),
                         "val_alone": [p.val.nonlinear(m) for m in models]})
            log(f"  -> val NL ensemble {grid[-1]['val_ensemble_softmax']:.4f}")
            _checkpoint(exp, grid)
        for l2 in (1e-4, 1e-3, 1e-2, 1e-1) if exp.nl_grid else ():
            probe = train_linear_probe(p.base, p.union, features=p.union_features, l2=l2)
            grid.append({"method": "linear_probe", "l2": l2, "val": p.val.probe(probe)})
        return {"experiment": exp.name, "mode": "select (validation split only)",
                "settings": {k: v for k, v in exp.__dict__.items()}, "grid": grid,
                "machine": machine()}


PROTOTYPE_GRID = (0.0, 0.03, 0.1, 0.3, 1.0)  # p of --prototypes, scored after training


def select_recipe(p: Prepared, tasks: list[Task], options: dict[str, Any], progress: bool
                  ) -> dict[str, Any]:
    """Validation accuracy of TMC (mean and sum) with one set of tangent options, for every
    prototype weight p of PROTOTYPE_GRID (cosine, and pool-whitened when there is a pool):
    the prototype term is added after training, so one training serves the whole grid."""
    log(f"select: tangent {options}")
    cfg = tangent_config(p, **options)
    comps = train_components(p, tasks, replace(cfg, prototypes=0.0), progress)
    plain = [r.delta for _, r in comps]
    by_p: dict[str, Any] = {}
    for weight in PROTOTYPE_GRID:
        c = replace(cfg, prototypes=weight)
        for name, pool in (("cosine", None), ("pool", p.pool)):
            if pool is None and name == "pool":
                continue
            deltas = with_prototypes(p, tasks, plain, c, pool)
            by_p[f"{name} p={weight:g}"] = {
                "val_tmc_mean": p.val.tmc(deltas),
                "val_tmc_sum": p.val.tmc(deltas, normalize="none")}
    log("  -> val TMC mean " + ", ".join(f"{k}: {v['val_tmc_mean']:.4f}"
                                          for k, v in by_p.items()))
    return {"method": "tmc", "options": options, "config": cfg.as_dict(),
            "by_prototypes": by_p, "val_alone": [p.val.tangent(d) for d in plain],
            "seconds": [r.train_seconds for _, r in comps]}


def _checkpoint(exp: Experiment, grid: list[dict[str, Any]]) -> None:
    """Partial --select results, so a long sweep can be read while it runs."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"accuracy_{exp.name}_select.partial.json").write_text(
        json.dumps(grid, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", choices=sorted(EXPERIMENTS))
    ap.add_argument("--all", action="store_true",
                    help="run " + ", ".join(DEFAULT_RUN) + " (what `make bench` runs)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run (120 rows per task, 40 for text; 2 epochs; one seed)")
    ap.add_argument("--seeds", help="comma-separated training seeds (default $TMC_BENCH_SEEDS "
                    "or " + ",".join(map(str, DEFAULT_SEEDS)) + "; --quick: 0)")
    ap.add_argument("--no-forgetting", action="store_true",
                    help="skip the registry forget check (it runs on the first seed)")
    ap.add_argument("--select", action="store_true", help="sweep κ/lr on the validation split")
    ap.add_argument("--epochs", type=int, help="override the experiment's epochs")
    ap.add_argument("--tmc-grid", help="--select: (κ, lr) grid, e.g. 300:1e-4,1000:1e-4")
    ap.add_argument("--nl-grid", help="--select: NL lr grid, e.g. 1e-4,1e-3 ('' for none)")
    ap.add_argument("--recipes", help="--select: JSON list of tangent option sets, e.g. "
                    "'[{\"quiet\": 1, \"prototypes\": 100}]' ('[]' for none)")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/...)")
    args = ap.parse_args(argv)
    if args.all == bool(args.experiment):
        ap.error("give exactly one of --experiment NAME or --all")
    if args.all and args.out:
        ap.error("--out names one result file: use it with --experiment")
    names = DEFAULT_RUN if args.all else (args.experiment,)
    for name in names:
        run_one(EXPERIMENTS[name], args)
    if not args.select:
        from bench.accuracy_report import write_plots

        for path in write_plots(RESULTS, quick=args.quick):
            log(f"wrote {path}")
    return 0


def run_one(exp: Experiment, args: argparse.Namespace) -> None:
    seeds_text = args.seeds or os.environ.get("TMC_BENCH_SEEDS")
    seeds = [int(x) for x in seeds_text.split(",")] if seeds_text else (
        [0] if args.quick else list(DEFAULT_SEEDS))
    if args.quick:  # text trunks cost ~10x more per row than the 64x64 image trunk
        rows, test, val = (40, 200, 100) if exp.preset == "minilm" else (120, 400, 200)
        exp = replace(exp, per_task=rows if exp.rule == "classes" else None,
                      pool=rows * exp.tasks if exp.rule == "shard" else None, epochs=2,
                      test_limit=test, val_limit=val)
    if args.epochs:
        exp = replace(exp, epochs=args.epochs)
    if args.tmc_grid is not None:
        pairs = (item.split(":") for item in args.tmc_grid.split(",") if item)
        exp = replace(exp, tmc_grid=[(float(k), float(lr)) for k, lr in pairs])
    if args.nl_grid is not None:
        exp = replace(exp, nl_grid=[float(x) for x in args.nl_grid.split(",") if x])
    if args.recipes is not None:
        exp = replace(exp, recipe_grid=list(json.loads(args.recipes)))

    torch.manual_seed(0)
    started = time.perf_counter()
    result = select(exp, args.progress) if args.select else run(
        exp, seeds, args.progress, forgetting=not args.no_forgetting)
    result["wall_seconds"] = time.perf_counter() - started
    result["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["quick"] = bool(args.quick)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    if args.quick:
        result["note"] = (f"smoke run ({exp.per_task or (exp.pool or 0) // exp.tasks} rows per "
                          "task, 2 epochs, one seed): far too few steps for the default "
                          "settings; not comparable with the full run")
    suffix = "_select" if args.select else "_quick" if args.quick else ""
    out = args.out or RESULTS / f"accuracy_{exp.name}{suffix}{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} ({result['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    raise SystemExit(main())
