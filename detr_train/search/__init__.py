"""Budgeted hyperparameter search: our own Optuna sweeper for Hydra multiruns.

Parts, each in its own module:

- `space`      Hydra's sweep grammar -> Optuna distributions
- `overrides`  values back into Hydra's override grammar
- `storage`    the study's storage string, shared by the sweeper and every job
- `factories`  samplers and pruners from `_target_` configs
- `config`     the sweeper's Hydra configs (`hydra/sweeper=detr_optuna`)
- `sweeper`    the Hydra Sweeper plugin; `session` runs one sweep (ask / launch / tell)
- `reporter`   the job side: report mAP per epoch, ask whether to stop
- `outcome`    a job's result -> COMPLETE / PRUNED / FAIL
- `attrs`      the study/trial attribute names both sides agree on
- `export`, `plots`  trials.csv, the best trial's re-run recipe, PNG plots
- `errors`     the errors a user sees (printed by Hydra without a traceback)

Nothing here imports Optuna at package import time.
"""
