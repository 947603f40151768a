"""Hydra plugin entry: the sweeper class Hydra instantiates, and its configs in the ConfigStore."""

from detr_train.search import config as _config
from detr_train.search import sweeper as _sweeper


class DetrOptunaSweeper(_sweeper.OptunaSearchSweeper):
    """Hydra only instantiates plugin classes defined under `hydra_plugins.`; this subclass
    adds nothing to detr_train.search.sweeper.OptunaSearchSweeper."""


_config.register_configs()
