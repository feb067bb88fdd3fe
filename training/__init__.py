"""Training side of tmc: datasets and shards, tangent components, the paper's baselines,
and their evaluation. ``training.cli`` holds the `tmc train` command.

Modules: ``data`` (datasets, fixed splits, shards), ``features`` (trunk-feature cache),
``tangent_train`` (train Δ), ``nonlinear`` (non-linear fine-tuning, weight averaging),
``probe`` (linear probe), ``evaluate`` (accuracy of any method on a split), ``cli``.
Submodules are imported on demand so that ``training.cli`` stays light.
"""
