"""Names of the attributes the sweeper, the jobs and the exports share through the study.

The study is the only channel between a job (possibly in another process or on another
machine) and the sweeper, so everything they must agree on is stored in it under these keys.
"""

# Study user attribute: the pruner's config (a `_target_` dict). Jobs rebuild the pruner
# from it, so they prune with exactly the sweeper's settings without seeing its config.
PRUNER = "detr_train.pruner"

# Trial user attributes.
PRUNED_AT = "detr_train.pruned_at"  # set by the job's reporter: the step at which it was told to stop
INTERRUPTED = "detr_train.interrupted"  # set by the job's reporter (or the sweeper): why the run was cut short
RUN_DIR = "detr_train.run_dir"  # set by the sweeper: the job's output directory
ERROR = "detr_train.error"  # set by the sweeper: why a FAIL trial failed
