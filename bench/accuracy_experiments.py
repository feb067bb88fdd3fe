"""The experiments bench.accuracy runs: base preset, data, task rule, training settings and
the validation grids ``--select`` sweeps; the default run and seeds.

Settings marked ``selected_on`` were chosen on a validation split (never the test split); the
file named there holds the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The joint tangent model (a reference: one model trained on every task's rows, not a
# composition) is trained on the first seed only, to keep `make bench` near an hour on 2
# cores: over 3 seeds its test accuracy varied by ≤ 0.06 points (0.8647–0.8653 class-IL,
# 0.8634–0.8635 data-IL; `make bench` of 2026-11-27 04:01), and it costs as much as 5
# components.
JOINT_SEEDS = 1


@dataclass
class Experiment:
    name: str
    preset: str
    data: str
    rule: str  # "classes" | "shard"
    tasks: int = 5
    per_task: int | None = None  # "classes": training rows drawn per task (fixed across seeds)
    pool: int | None = None  # "shard": rows drawn from the training split, then sharded
    epochs: int = 10
    nl_lr: float | None = None  # None: training.nonlinear.default_nonlinear_lr
    kappa: float | None = None  # None: training.tangent_train.default_kappa(rule)
    lr: float | None = None  # None: training.tangent_train.default_lr(base, rule)
    probe_l2s: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # chosen on the validation split
    split_seed: int = 0
    val_fraction: float = 0.1
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    test_limit: int | None = None
    val_limit: int | None = None
    selected_on: str = ""  # which --select sweep chose κ / lr (result file)
    joint_seeds: int | None = JOINT_SEEDS  # joint tangent on the first n seeds (None: all)
    # --select grids: (kappa, lr) pairs for TMC, lrs for the NL fine-tunes
    tmc_grid: list[tuple[float, float]] = field(default_factory=list)
    nl_grid: list[float] = field(default_factory=list)
    labels: tuple[str, ...] | None = None  # the base's labels (None: the preset's)
    # unlabeled pool for whitened prototypes: up to this many training rows outside every
    # task (seeded, the same for every component and seed); None: no pool variant
    pool_rows: int | None = None
    pool_shrinkage: float = 0.3
    recipe: dict[str, Any] = field(default_factory=dict)  # TangentConfig overrides
    # --select --recipes: option sets (TangentConfig overrides) scored on validation
    recipe_grid: list[dict[str, Any]] = field(default_factory=list)


FMNIST_DATA_IL_TMC_GRID = [(1.0, 1e-3), (5.0, 1e-3), (15.0, 1e-3), (50.0, 1e-3), (5.0, 1e-4),
                           (15.0, 1e-4)]


EXPERIMENTS = {
    "fmnist-class-il": Experiment(
        "fmnist-class-il", "effnet-lite0", "fashion-mnist", "classes", per_task=2000, epochs=10,
        selected_on="accuracy_fmnist-class-il_select*.json",
        tmc_grid=[(k, lr) for lr in (1e-4, 1e-3) for k in (5.0, 15.0, 50.0, 150.0)]
        + [(300.0, 1e-4), (1000.0, 1e-4)], nl_grid=[1e-4, 3e-4, 1e-3, 3e-3], pool_rows=2000),
    # data-incremental: one fixed pool of 10,000 training images cut into 5 or 10 shards
    # (2,000 or 1,000 images each); the shard assignment changes with the seed
    "fmnist-data-il": Experiment(
        "fmnist-data-il", "effnet-lite0", "fashion-mnist", "shard", pool=10_000, epochs=10,
        selected_on="accuracy_fmnist-data-il_select.json",
        tmc_grid=list(FMNIST_DATA_IL_TMC_GRID), nl_grid=[1e-4, 1e-3]),
    "fmnist-data-il-10": Experiment(
        "fmnist-data-il-10", "effnet-lite0", "fashion-mnist", "shard", tasks=10, pool=10_000,
        epochs=10, selected_on="accuracy_fmnist-data-il_select.json (5 shards)",
        tmc_grid=list(FMNIST_DATA_IL_TMC_GRID), nl_grid=[1e-4, 1e-3]),
    "bbc-data-il": Experiment(
        "bbc-data-il", "minilm", "bbc", "shard", epochs=5,
        selected_on="accuracy_bbc-data-il_select.json",
        tmc_grid=[(5.0, 1e-4), (5.0, 1e-3), (15.0, 1e-3), (5.0, 3e-4)], nl_grid=[1e-4, 1e-3]),
    # text, class-incremental: BBC News in 2 tasks, {business, entertainment} and
    # {politics, sport, tech}; every training row of a task's classes; no pool
    "bbc-class-il": Experiment(
        "bbc-class-il", "minilm", "bbc", "classes", tasks=2, epochs=5, kappa=15.0, lr=1e-3,
        selected_on="κ, lr from bbc-data-il's validation; p = the --classes default "
        "(accuracy_bbc-class-il_select.json: the κ = 15 row)", nl_grid=[3e-4, 1e-3]),
    # a second class-incremental dataset: scikit-learn's 8×8 digits as images, 5 tasks × 2
    # digits, 150 training rows per task; the ~330 training rows left form the unlabeled
    # pool; 20% validation, 20% test (359 rows each)
    "digits-class-il": Experiment(
        "digits-class-il", "effnet-lite0", "digits-images", "classes", per_task=150,
        epochs=10, pool_rows=1000, kappa=50.0, lr=1e-3, nl_lr=3e-4,
        recipe={"prototypes": 0.3},
        labels=tuple(str(i) for i in range(10)), val_fraction=0.2,
        selected_on="accuracy_digits-class-il_select.json",
        tmc_grid=[], nl_grid=[1e-4, 3e-4, 1e-3, 3e-3]),
}


DEFAULT_RUN = ("fmnist-class-il", "digits-class-il", "bbc-class-il", "fmnist-data-il",
               "fmnist-data-il-10", "bbc-data-il")


DEFAULT_SEEDS = (0, 1, 2)
