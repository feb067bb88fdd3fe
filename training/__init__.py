"""Training side of tmc: datasets and shards, tangent components, the paper's baselines,
and their evaluation. The `tmc train` command that drives it is cli/train.py.

Modules: ``dataset`` (the Dataset type), ``sources`` (dataset loaders), ``data`` (fixed
splits, shards; re-exports both), ``features`` (trunk-feature cache), ``loop`` (the training
loop both trainers share), ``tangent_train`` (train Δ), ``nonlinear`` (non-linear
fine-tuning, weight averaging), ``probe`` (linear probe), ``evaluate`` (accuracy of any
method on a split), ``protocols`` (the accuracy protocols: every method's scores, the
continual curve, the forgetting check). Submodules are imported on demand.
"""
