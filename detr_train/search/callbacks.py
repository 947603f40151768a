"""The search's part in a training run: a callback that reports validation mAP to the trial
and ends the run when Optuna prunes it.

`detr_train.cli.callbacks` adds it to a run inside a search (`trial.number` set);
training never imports it.
"""

from __future__ import annotations

import logging
from typing import Any

from detr_train.search.reporter import Reporter, reporter_for
from detr_train.training.callbacks import Callback, EpochResult

log = logging.getLogger(__name__)


class ReportToTrial(Callback):
    """After every evaluated epoch: report mAP; stop the run when the trial should be pruned.

    A trial is never pruned after its last epoch: nothing is left to save there, and a
    successive-halving rung that falls on it would only discard a finished result. Nor is
    one that another callback already ends (early stopping): it finished, COMPLETE.
    """

    def __init__(self, reporter: Reporter):
        self.reporter = reporter

    def on_epoch_end(self, trainer, result: EpochResult) -> None:
        if not result.evaluated:
            return
        self.reporter.report(result.epoch, result.map)
        if trainer.stop_request is None and result.epoch < trainer.epochs and self.reporter.should_prune():
            log.info("Trial pruned by the search after epoch %d (mAP %.4f)", result.epoch, result.map)
            trainer.request_stop("pruned by the search", interrupted=False)

    def on_interrupt(self, trainer, where: str) -> None:
        self.reporter.interrupted(trainer.stop_request.reason)


def trial_callbacks(trial_cfg: Any) -> list[Callback]:
    """[ReportToTrial] inside a search (`trial.number` set), [] otherwise (Optuna not imported)."""
    if trial_cfg is None or trial_cfg.get("number") is None:
        return []
    return [ReportToTrial(reporter_for(trial_cfg))]
