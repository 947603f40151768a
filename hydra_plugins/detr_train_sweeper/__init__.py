"""Registers detr_train's Optuna sweeper with Hydra (`hydra/sweeper=detr_optuna`).

Only a shim: Hydra discovers plugins in the `hydra_plugins` namespace package (which has
no `__init__.py` of its own); the sweeper itself lives in `detr_train.search`.
"""
