"""A search in MLflow: one parent run per sweep, each trial's run a child of it.

When the searched app's config has `logger.mlflow` (detr-train with `logger=mlflow`), the
sweeper opens the parent run before the first trial and hands each trial job its id and
the resolved tracking URI as overrides (`trial.mlflow_parent_run_id`,
`logger.mlflow.tracking_uri`): jobs may run in other processes or on other machines, so
they learn it from their config, and every child lands in the parent's store even when a
job starts in another folder. The job's own tracker (`reporting.mlflow_tracker`) creates
the child run, tagged with `trial_number`. Once the sweeper has recorded a trial, it tags
the child with `trial_state`, the state trials.csv holds (COMPLETE, PRUNED or FAIL).

The parent's id is kept in the study, so a re-run of the same sweep continues the same
parent. As in training, a tracker failure is a warning: the search goes on untracked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from detr_train.reporting import mlflow_tracker as tracker
from detr_train.search.overrides import override

log = logging.getLogger(__name__)

# Study user attribute: the sweep's MLflow parent run.
PARENT_RUN_ATTR = "detr_train.mlflow_parent_run_id"
SWEEP_DIR_TAG = "sweep_dir"
STUDY_TAG = "study_name"


class SweepTracking:
    """The sweep's parent MLflow run, and the tagging of its children."""

    def __init__(self, client: Any, target: tracker.TrackingTarget, experiment_id: str, parent_run_id: str):
        self.client = client
        self.target = target
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    @classmethod
    def open(cls, config: DictConfig, study: Any, sweep_dir: Path) -> SweepTracking | None:
        """The parent run of this sweep (created, or the one a previous run of it made), or None
        when the app does not log to MLflow or MLflow cannot be reached (one warning)."""
        mlflow_cfg = OmegaConf.select(config, "logger.mlflow")
        if mlflow_cfg is None:
            return None
        target = tracker.tracking_target(mlflow_cfg.tracking_uri, config.output_root)
        try:
            client = tracker.open_client(target.uri)
            experiment_id = tracker.experiment_id(client, str(mlflow_cfg.experiment_name), target.artifact_location)
            parent = _earlier_parent(client, study.user_attrs.get(PARENT_RUN_ATTR))
            if parent is None:
                parent = client.create_run(experiment_id, run_name=sweep_dir.name, tags={
                    SWEEP_DIR_TAG: str(sweep_dir), STUDY_TAG: study.study_name}).info.run_id
                study.set_user_attr(PARENT_RUN_ATTR, parent)
            else:
                client.update_run(parent, status="RUNNING")
        except Exception as error:  # noqa: BLE001 - tracking must never cost a search
            tracker.warn(f"open the sweep's run in {target.uri}; each trial is tracked on its own", error)
            return None
        log.info("MLflow: sweep run %s in %s; each trial is a child run", parent, target.uri)
        return cls(client, target, experiment_id, parent)

    def trial_overrides(self) -> list[str]:
        """What each trial job needs to become a child of this sweep's run, in the same store."""
        return [override("trial.mlflow_parent_run_id", self.parent_run_id),
                override("logger.mlflow.tracking_uri", self.target.uri)]

    def record_trial(self, number: int, state: str) -> None:
        """Tag trial `number`'s run with the state the sweeper recorded for it."""
        try:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{tracker.PARENT_RUN_TAG}` = '{self.parent_run_id}' "
                              f"and tags.`{tracker.TRIAL_NUMBER_TAG}` = '{number}'",
            )
            for run in runs:  # one; none when the job failed before its tracker started
                self.client.set_tag(run.info.run_id, tracker.TRIAL_STATE_TAG, state)
        except Exception as error:  # noqa: BLE001 - tracking must never cost a search
            tracker.warn(f"tag trial {number}'s run {state}", error)

    def close(self, best_value: float | None, status: str) -> None:
        try:
            if best_value is not None:
                self.client.log_metric(self.parent_run_id, "best_value", best_value)
            self.client.set_terminated(self.parent_run_id, status=status)
        except Exception as error:  # noqa: BLE001 - tracking must never cost a search
            tracker.warn("end the sweep's run", error)


def _earlier_parent(client: Any, run_id: str | None) -> str | None:
    if not run_id:
        return None
    if tracker.find_run(client, run_id) is None:
        log.warning("MLflow: the sweep's earlier run %s is not in this store; starting a new one", run_id)
        return None
    return run_id
