"""Every callback a configured training run has, in the order they run.

The Trainer evaluates each due epoch before any callback sees it; then, per hook, the
callbacks run in this list's order. Why each stands where it does:

0. DataReport: what the run learns from is in the log and in data_report.json before its
   first step (it acts only at the start).
1. LogMetrics: the epoch's line is in metrics.jsonl before anything that may fail or stop.
2. EarlyStopping: updates its counter before the checkpoint, so that the checkpoint holds
   the counter of the epoch it ends (a resumed run stops where the uninterrupted one would).
3. SaveCheckpoints: the epoch is safe from here on.
4. ReportToTrial (in a search): prunes after the checkpoint, so a pruned trial keeps its
   last epoch; a pruned trial is a normal end, and the callbacks below still run.
5. CheckReplicas, ExportHF: debugging aid and the final export, on the saved state.
6. Pictures (curves, plots, prediction images), then the trackers (`logger`: TensorBoard,
   MLflow), which log what the others drew: after the checkpoint, so that drawing and
   tracking can never cost one. MLflow there may miss the epoch a kill cuts off after the
   checkpoint, never log one twice; it adds what it misses from metrics.jsonl on resume.
7. StopOnSignal: says the run stopped; it hands the signal on to the previous handler (a
   requeue) only when the run closes, after every other callback has run.
8. NextSteps, last: the run's last lines say where its results are and what to run next.
"""

from __future__ import annotations

from omegaconf import DictConfig

from detr_train.reporting.next_steps import NextSteps
from detr_train.reporting.trackers import tracker_callbacks
from detr_train.reporting.visual_callbacks import visual_callbacks
from detr_train.search.callbacks import trial_callbacks
from detr_train.training import callbacks as cb


def build_callbacks(cfg: DictConfig) -> list[cb.Callback]:
    """The callbacks that `cfg` asks for (see the module docstring for their order)."""
    train_cfg = cfg.training
    callbacks: list[cb.Callback] = [cb.DataReport(), cb.LogMetrics()]
    if train_cfg.early_stop.patience:
        callbacks.append(cb.EarlyStopping(train_cfg.early_stop.patience, train_cfg.early_stop.min_delta))
    callbacks.append(cb.SaveCheckpoints(train_cfg.checkpoint.every_n_steps))
    callbacks += trial_callbacks(cfg.get("trial"))
    if train_cfg.ddp.check_replicas_every:
        callbacks.append(cb.CheckReplicas(train_cfg.ddp.check_replicas_every))
    if train_cfg.export_hf:
        callbacks.append(cb.ExportHF())
    callbacks += visual_callbacks(train_cfg)
    callbacks += tracker_callbacks(cfg)
    callbacks += [cb.StopOnSignal(), NextSteps()]
    return callbacks
