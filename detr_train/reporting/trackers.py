"""The experiment trackers a run logs to: the `logger` config group, as Trainer callbacks.

    logger=none                    (default) the run dir's files only
    logger=tensorboard             <run dir>/tensorboard events  (reporting.visual_callbacks)
    logger=mlflow                  an MLflow run                 (reporting.mlflow_tracker)
    logger=[tensorboard,mlflow]    both; also logger=many

Each chosen tracker is a non-null node of `cfg.logger`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from detr_train.reporting.mlflow_tracker import MlflowSettings, MlflowTracking
from detr_train.reporting.visual_callbacks import TensorBoardLogging
from detr_train.training.callbacks import Callback


def tracker_callbacks(cfg: DictConfig) -> list[Callback]:
    """The tracker callbacks `cfg.logger` asks for; they log what the drawing callbacks drew,
    so they come after them."""
    logger = cfg.get("logger")
    if logger is None:
        return []
    callbacks: list[Callback] = []
    if logger.tensorboard is not None:
        callbacks.append(TensorBoardLogging())
    if logger.mlflow is not None:
        callbacks.append(MlflowTracking(MlflowSettings.of(cfg)))
    return callbacks
