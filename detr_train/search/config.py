"""The sweeper's Hydra config: `hydra/sweeper=detr_optuna`, with sampler and pruner sub-groups.

Keys shared with the upstream hydra-optuna-sweeper read the same (sampler, direction,
study_name, storage, n_trials, n_jobs, max_failure_rate, params); `pruner` is new.
Samplers and pruners are `_target_` configs, so any Optuna class or argument can be named:

    hydra/sweeper/sampler=random            hydra.sweeper.sampler.seed=7
    +hydra.sweeper.sampler.multivariate=false
    hydra/sweeper/pruner=threshold          hydra.sweeper.pruner.lower=0.05
    hydra.sweeper.pruner._target_=optuna.pruners.PercentilePruner +hydra.sweeper.pruner.percentile=25
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Hydra only instantiates plugin classes that live under `hydra_plugins.`; the shim there
# subclasses detr_train.search.sweeper.OptunaSearchSweeper without changing it.
SWEEPER_TARGET = "hydra_plugins.detr_train_sweeper.detr_train_sweeper.DetrOptunaSweeper"
SWEEPER_NAME = "detr_optuna"
DEFAULT_SEED = 42


# --- samplers ---------------------------------------------------------------------------


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = DEFAULT_SEED
    # Random trials before TPE starts modelling; Optuna's 10 would leave little for TPE in
    # the 10-20 trial searches a budget allows.
    n_startup_trials: int = 5
    # Everything else keeps Optuna's defaults (in Optuna 5: multivariate, constant_liar);
    # add keys with `+hydra.sweeper.sampler.<name>=...`.


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = DEFAULT_SEED


@dataclass
class GridSamplerConf:
    # search_space is filled in from hydra.sweeper.params; every param must be discrete.
    _target_: str = "optuna.samplers.GridSampler"
    seed: Optional[int] = DEFAULT_SEED


@dataclass
class CmaEsSamplerConf:
    # Needs `pip install cmaes`; categorical params fall back to independent random sampling.
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = DEFAULT_SEED
    n_startup_trials: int = 1
    sigma0: Optional[float] = None


# --- pruners ----------------------------------------------------------------------------
# Steps are 1-based epochs, so `n_warmup_steps: k` means "pruning may start at epoch k".


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 4  # finished trials before anyone is pruned
    # Judge from epoch 1: a trial is pruned only when strictly below the median, so the
    # all-zero mAPs of a first epoch prune nobody, while clear losers stop at once.
    n_warmup_steps: int = 1
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class ThresholdPrunerConf:
    # The seed design's "stop below mAP x": prune when the reported mAP is below `lower`.
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: Optional[float] = 0.01
    upper: Optional[float] = None
    n_warmup_steps: int = 2
    interval_steps: int = 1


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # "auto": the epochs of the first finished trial
    reduction_factor: int = 3


@dataclass
class SuccessiveHalvingPrunerConf:
    # Keeps the best 1/reduction_factor of the trials at each rung: epochs 1, 2, 4, 8, ...
    # A rung on a trial's last epoch is never applied (nothing is left to save there).
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    # Steps are epochs, so the first rung is epoch 1. Optuna's "auto" also comes to 1 here,
    # but only once a trial has finished, and the first trial's mAPs then never join a rung.
    min_resource: Any = 1
    # Optuna's default is 4. The few-epoch trials of a screening budget then have a single
    # rung, at epoch 1, where mAP says least: measured on 4-epoch search=lr trials, 4 kept a
    # best mAP 27% short of the unpruned sweep's, 2 kept one 3% above it; on 5-epoch trials
    # 2 trained 0.55 of the epochs, best 2% above (docs/search.md).
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


# --- the sweeper ------------------------------------------------------------------------


@dataclass
class OptunaSearchSweeperConf:
    _target_: str = SWEEPER_TARGET
    # The sweeper builds the sampler (which may need the search space) and stores the
    # pruner's config in the study for the jobs, so Hydra must hand both over unbuilt.
    _recursive_: bool = False
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])

    sampler: Any = MISSING
    pruner: Any = MISSING
    # maximize | minimize: the job's return value (best validation mAP for detr-train).
    direction: str = "maximize"
    # null: the sweep directory's name. A study of that name in `storage` is resumed.
    study_name: Optional[str] = None
    # null: an Optuna journal file in the sweep directory. Else an RDB URL
    # (sqlite:///..., postgresql://...), redis://..., or a journal file path.
    storage: Optional[str] = None
    # Finished trials (COMPLETE + PRUNED + FAIL, not counting interrupted ones) the study
    # should hold; a re-run only runs the missing ones.
    n_trials: int = 20
    # Trials launched together (in parallel with a parallel launcher such as joblib).
    n_jobs: int = 1
    # Give up once more than this fraction of the trials this run plans has failed.
    max_failure_rate: float = 0.5
    # `key: sweep` in Hydra's sweep grammar; fixed values are passed to every trial.
    # An empty dict (not null) so that `hydra.sweeper.params.<key>=...` can add to it.
    params: dict[str, Any] = field(default_factory=dict)


_SAMPLERS = {"tpe": TPESamplerConf, "random": RandomSamplerConf, "grid": GridSamplerConf, "cmaes": CmaEsSamplerConf}
_PRUNERS = {
    "median": MedianPrunerConf,
    "threshold": ThresholdPrunerConf,
    "hyperband": HyperbandPrunerConf,
    "successive_halving": SuccessiveHalvingPrunerConf,
    "nop": NopPrunerConf,
}


def register_configs() -> None:
    """Put the sweeper and its sampler/pruner options into Hydra's ConfigStore."""
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name=SWEEPER_NAME, node=OptunaSearchSweeperConf, provider="detr_train")
    for name, node in _SAMPLERS.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="detr_train")
    for name, node in _PRUNERS.items():
        store.store(group="hydra/sweeper/pruner", name=name, node=node, provider="detr_train")
