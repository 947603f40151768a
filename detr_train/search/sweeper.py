"""The Hydra side of the search: a Sweeper plugin that hands the work to `session.run_search`.

Hydra imports every plugin module at start-up, even for `--help`, so this module imports
only Hydra and OmegaConf; Optuna and the rest come in when a sweep actually starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from detr_train.errors import exit_with_error, verbose
from detr_train.search.errors import SearchConfigError

DIRECTIONS = ("maximize", "minimize")


@dataclass(frozen=True)
class SweepSettings:
    """The sweeper's config (hydra.sweeper.*), checked."""

    sampler: Any
    pruner: Any
    direction: str
    study_name: str | None
    storage: str | None
    n_trials: int
    n_jobs: int
    max_failure_rate: float
    params: Any

    def check(self) -> None:
        if self.direction not in DIRECTIONS:
            raise SearchConfigError(
                f"hydra.sweeper.direction must be one of {DIRECTIONS} (one objective: the job's return "
                f"value), got {self.direction!r}"
            )
        if self.n_trials < 0:
            raise SearchConfigError(f"hydra.sweeper.n_trials must be >= 0, got {self.n_trials}")
        if self.n_jobs < 1:
            raise SearchConfigError(f"hydra.sweeper.n_jobs must be >= 1, got {self.n_jobs}")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SearchConfigError(f"hydra.sweeper.max_failure_rate must be in [0, 1], got {self.max_failure_rate}")


class OptunaSearchSweeper(Sweeper):
    """Asks Optuna for trials, launches each as a Hydra job, tells Optuna how it ended.

    Registered with Hydra as `hydra/sweeper=detr_optuna` through the shim in
    `hydra_plugins/detr_train_sweeper`.
    """

    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: str = "maximize",
        study_name: str | None = None,
        storage: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        max_failure_rate: float = 0.5,
        params: Any = None,
    ) -> None:
        super().__init__()
        self.settings = SweepSettings(
            sampler=sampler,
            pruner=pruner,
            direction=str(direction).lower(),
            study_name=None if study_name is None else str(study_name),
            storage=None if storage is None else str(storage),
            n_trials=int(n_trials),
            n_jobs=int(n_jobs),
            max_failure_rate=float(max_failure_rate),
            params=params,
        )
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from detr_train.search.session import run_search

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        try:
            self.settings.check()
            return run_search(self, list(arguments))
        except SearchConfigError as error:
            # A mistake in the request: one line, like every other config error of detr-train.
            if verbose():
                raise
            exit_with_error(error)
