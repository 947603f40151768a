"""MLflow tracking of a training run (`logger=mlflow`), as a Trainer callback.

One MLflow run per training run, written by the main process only:

    params      the composed config, flattened (`training.lr`, `model.d_model`, ...)
    metrics     every number of every metrics.jsonl record, step = its epoch, under the
                record's own key (`map`, `train_loss`, `map_per_class/<class>`; see
                `reporting.records` for what is left out: `epoch` is the step)
    artifacts   training_curves.png every epoch; plots/ and predictions/epoch_NNNN/ at
                each evaluation (logger.mlflow.artifacts)
    tags        run_dir (where the run's files are); in a search also trial_number, the
                sweep's run as `mlflow.parentRunId`, and trial_state set by the sweeper

The run id is checkpointed (`state_key`), so a resumed run continues the same MLflow run.
Which epochs the MLflow run holds is read back from it (the `global_step` metric of each
epoch), and every metrics.jsonl record it lacks is logged: the callback stands after the
checkpoint, so a kill between the two leaves an epoch out of MLflow, never in twice, and
the resumed run adds it. An epoch whose logging failed (a server away) is added the same
way at the next epoch.

Tracking must never cost a training run: every MLflow call is guarded, a failure is one
warning and training goes on; after MAX_FAILURES in a row the run stops trying. mlflow is
imported when the run starts (it takes seconds), never at module import.

Local store. MLflow 3 refuses its plain-folder store (`./mlruns`) unless
MLFLOW_ALLOW_FILE_STORE=true, and defaults to SQLite; so does this: with
`logger.mlflow.tracking_uri=null` runs go to sqlite:///<output_root>/mlruns/mlflow.db, their
artifacts to <output_root>/mlruns/artifacts, which `mlflow ui --backend-store-uri` opens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from detr_train.checkpointing.metrics_log import MetricsLog
from detr_train.errors import one_line
from detr_train.reporting.records import record_numbers
from detr_train.reporting.visual_callbacks import CURVES_FILE
from detr_train.training.callbacks import Callback, EpochResult

if TYPE_CHECKING:
    from detr_train.training.callbacks import Trainer

log = logging.getLogger(__name__)

STORE_FOLDER = "mlruns"
STORE_DB = "mlflow.db"
ARTIFACTS_FOLDER = "artifacts"
INSTALL_HINT = "pip install 'detr-train[mlflow]'"
# The metric whose steps say which epochs a run holds: every record has it.
EPOCHS_METRIC = "global_step"
STEP_KEY = "epoch"
# Tags.
RUN_DIR_TAG = "run_dir"
TRIAL_NUMBER_TAG = "trial_number"
TRIAL_STATE_TAG = "trial_state"
PARENT_RUN_TAG = "mlflow.parentRunId"  # how the MLflow UI nests a run under another
MAX_FAILURES = 3
MAX_PARAM_LENGTH = 6000
_MESSAGE_LIMIT = 300


# --- where runs go ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingTarget:
    """A tracking store, and where new experiments put their artifacts (None: the store decides)."""

    uri: str
    artifact_location: str | None = None


def tracking_target(tracking_uri: str | None, output_root: str | Path) -> TrackingTarget:
    """`logger.mlflow.tracking_uri`, or the local default under the outputs root. A SQLite store
    keeps its artifacts in the folder beside its database (MLflow's own default would be the
    current folder's ./mlruns, wherever the run was started)."""
    uri = tracking_uri or f"sqlite:///{Path(output_root).resolve() / STORE_FOLDER / STORE_DB}"
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):])
        if database.is_absolute():
            database.parent.mkdir(parents=True, exist_ok=True)
            return TrackingTarget(uri, (database.parent / ARTIFACTS_FOLDER).as_uri())
    return TrackingTarget(uri)


def open_client(uri: str) -> Any:
    """An `mlflow.tracking.MlflowClient` for `uri`; ImportError with the pip command without mlflow."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as error:
        raise ImportError(f"the mlflow package is not installed: {INSTALL_HINT}") from error
    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - another process (a parallel trial) may have just created it
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_run(client: Any, run_id: str) -> Any | None:
    """The run `run_id` of this store, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def warn(what: str, error: BaseException) -> None:
    """A tracker's failure as one warning line: training (or the search) goes on."""
    log.warning("MLflow: could not %s (training goes on): %s: %s",
                what, type(error).__name__, one_line(str(error))[:_MESSAGE_LIMIT])
    log.debug("the MLflow error", exc_info=True)


# --- what is logged --------------------------------------------------------------------


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The composed config flattened to MLflow params: dotted keys, values as text (lists as
    JSON, null as null). Empty mappings (`logger.tensorboard: {}`) have no leaf."""
    return dict(_flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))


def _flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif node is None:
        yield prefix[:-1], "null"
    elif isinstance(node, list):
        yield prefix[:-1], json.dumps(node)
    else:
        yield prefix[:-1], str(node)


def metric_name(key: str, name: str | None) -> str:
    """The record's own key; `<key>/<name>` inside a nested one. Characters MLflow refuses in a
    name (a class called "a+b") become `_`."""
    full = key if name is None else f"{key}/{name}"
    return "".join(c if c.isalnum() or c in "_-. /:" else "_" for c in full)


def record_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The MLflow metrics of one metrics.jsonl record (logged at step = its epoch)."""
    return {metric_name(key, name): value for key, name, value in record_numbers(record, skip=frozenset({STEP_KEY}))}


# --- the callback ----------------------------------------------------------------------


@dataclass(frozen=True)
class MlflowSettings:
    """What a run needs to know to track itself: `logger.mlflow` resolved, and its search trial."""

    target: TrackingTarget
    experiment_name: str
    artifacts: bool
    parent_run_id: str | None = None
    trial_number: int | None = None

    @classmethod
    def of(cls, cfg: DictConfig) -> MlflowSettings:
        mlflow_cfg = cfg.logger.mlflow
        trial = cfg.get("trial") or {}
        return cls(tracking_target(mlflow_cfg.tracking_uri, cfg.output_root), str(mlflow_cfg.experiment_name),
                   bool(mlflow_cfg.artifacts), trial.get("mlflow_parent_run_id"), trial.get("number"))


class MlflowTracking(Callback):
    """Logs the run to MLflow (see the module docstring): after the checkpoint, and after the
    drawing callbacks, whose pictures it uploads."""

    state_key = "mlflow"

    def __init__(self, settings: MlflowSettings):
        self.settings = settings
        self.run_id: str | None = None  # checkpointed: a resumed run continues this MLflow run
        self._client: Any = None  # None: not tracking (another rank, or MLflow unreachable)
        self._logged_through = 0  # the last epoch the MLflow run holds
        self._failures = 0
        self._end_status = "FAILED"  # unless the run finishes or is stopped by a signal

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id") or None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            client = open_client(self.settings.target.uri)
            run_id = self._continue(client, trainer) if self.run_id else None
            if run_id is None:
                run_id = self._create(client, trainer)
            held = [m.step for m in client.get_metric_history(run_id, EPOCHS_METRIC)]
        except Exception as error:  # noqa: BLE001 - tracking must never cost a run
            warn(f"start tracking in {self.settings.target.uri}; this run is not tracked", error)
            return
        self._client, self.run_id = client, run_id
        self._logged_through = max(held, default=0)
        if self._logged_through > trainer.state.epoch:
            log.warning("MLflow run %s already holds epochs %d-%d, newer than the checkpoint resumed (epoch %d): "
                        "they will be logged again", run_id, trainer.state.epoch + 1, self._logged_through,
                        trainer.state.epoch)
            self._logged_through = trainer.state.epoch
        with self._guarded("log the epochs before this resume"):
            self._log_epochs(trainer, trainer.state.epoch)

    def _create(self, client: Any, trainer: Trainer) -> str:
        settings = self.settings
        tags = {RUN_DIR_TAG: str(Path(trainer.run_dir).resolve())}
        if settings.trial_number is not None:
            tags[TRIAL_NUMBER_TAG] = str(settings.trial_number)
        if settings.parent_run_id:
            tags[PARENT_RUN_TAG] = settings.parent_run_id
        run = client.create_run(experiment_id(client, settings.experiment_name, settings.target.artifact_location),
                                run_name=Path(trainer.run_dir).name, tags=tags)
        run_id = run.info.run_id
        _log_params(client, run_id, config_params(trainer.cfg))
        log.info("MLflow run %s in %s (experiment '%s')", run_id, settings.target.uri, settings.experiment_name)
        return run_id

    def _continue(self, client: Any, trainer: Trainer) -> str | None:
        run = find_run(client, self.run_id)
        if run is None:
            log.warning("MLflow run %s (from the checkpoint) is not in %s: starting a new MLflow run",
                        self.run_id, self.settings.target.uri)
            return None
        client.update_run(self.run_id, status="RUNNING")
        # Params cannot change in MLflow: keys new to the config are added, the values the
        # resume changed (training.epochs, ...) are in the run dir's .hydra/config.resumed_*.yaml.
        held = run.data.params
        _log_params(client, self.run_id, {k: v for k, v in config_params(trainer.cfg).items() if k not in held})
        log.info("MLflow run %s continues in %s", self.run_id, self.settings.target.uri)
        return self.run_id

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if self._client is None:
            return
        with self._guarded(f"log epoch {result.epoch}"):
            self._log_epochs(trainer, result.epoch)
            if self.settings.artifacts:
                self._log_pictures(trainer, result)

    def _log_epochs(self, trainer: Trainer, through: int) -> None:
        """Every metrics.jsonl record after the last epoch the MLflow run holds, up to `through`."""
        from mlflow.entities import Metric

        records = [r for r in MetricsLog.of_run(trainer.run_dir).read()
                   if self._logged_through < int(r[STEP_KEY]) <= through]
        if not records:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, int(record[STEP_KEY]))
                   for record in records for key, value in record_metrics(record).items()]
        self._client.log_batch(self.run_id, metrics=metrics)
        self._logged_through = int(records[-1][STEP_KEY])

    def _log_pictures(self, trainer: Trainer, result: EpochResult) -> None:
        client, run_id = self._client, self.run_id
        curves = Path(trainer.run_dir) / CURVES_FILE
        if curves.is_file():
            client.log_artifact(run_id, str(curves))
        for tag, pictures in result.pictures.items():
            for index, picture in enumerate(pictures):
                if isinstance(picture, Path):  # a plot file, replaced at each evaluation
                    client.log_artifact(run_id, str(picture), artifact_path=tag.rpartition("/")[0] or None)
                else:  # a drawn uint8 CHW image, one folder per epoch
                    client.log_image(run_id, picture.permute(1, 2, 0).cpu().numpy(),
                                     artifact_file=f"{tag}/epoch_{result.epoch:04d}/{index}.png")

    def on_interrupt(self, trainer: Trainer, where: str) -> None:
        self._end_status = "KILLED"  # MLflow's word for a run stopped before its end: it resumes

    def on_fit_end(self, trainer: Trainer) -> None:
        self._end_status = "FINISHED"

    def close(self) -> None:
        if self._client is None:
            return
        with self._guarded("end the run"):
            self._client.set_terminated(self.run_id, status=self._end_status)
        self._client = None

    @contextlib.contextmanager
    def _guarded(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as error:  # noqa: BLE001 - tracking must never cost a run
            warn(what, error)
            self._failures += 1
            if self._failures >= MAX_FAILURES:
                log.warning("MLflow: %d failures in a row; no more tracking for this run", self._failures)
                self._client = None
        else:
            self._failures = 0


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    if params:
        # MLflow refuses longer values; no config value comes near it, a long data path might.
        client.log_batch(run_id, params=[Param(key, value[:MAX_PARAM_LENGTH]) for key, value in params.items()])
