"""What happens around the training loop, as callbacks the Trainer calls in list order.

Hooks (each optional):
    on_fit_start(trainer)                 once, after a resume has been loaded
    on_step_end(trainer)                  after every optimiser step
    on_epoch_end(trainer, result)         after every completed epoch, evaluated or not:
                                          `result` is the epoch's finished record
    on_interrupt(trainer, where)          the run stops before its end (a signal): save, tell
    on_fit_end(trainer)                   the run finished (or was pruned)
    close()                               always, last

Whoever builds a run passes its callbacks in, in order (`detr_train.cli.callbacks` for the
command line); the Trainer knows none of them. A callback with state declares a
`state_key`, and the Checkpointer saves and restores its `state_dict` under that key.
Callbacks do not read each other: what one draws for another to log goes through
`EpochResult.pictures`, the one channel between them.

A callback ends the run with `trainer.request_stop(reason, interrupted=...)`: pruning is
a normal end, a signal an interruption (the run can be resumed). The first request wins.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol

from detr_train.checkpointing.atomic import remove_temp_files
from detr_train.checkpointing.metrics_log import MetricsLog
from detr_train.data.health import health_report, write_report
from detr_train.distributed import collectives
from detr_train.evaluation.coco import CocoScores, format_per_class_table
from detr_train.modeling.hf_export import hf_export_problem, save_pretrained_folder
from detr_train.training.signals import GracefulStop

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

    from detr_train.checkpointing.checkpointer import Checkpointer
    from detr_train.checkpointing.state import TrainState
    from detr_train.data.build import DataBundle
    from detr_train.distributed.launch import DistContext

log = logging.getLogger(__name__)


class Trainer(Protocol):
    """What callbacks see of the Trainer (`detr_train.training.trainer.Trainer`)."""

    cfg: DictConfig
    run_dir: Path
    dist: DistContext
    state: TrainState
    data: DataBundle
    epochs: int
    batches_per_epoch: int
    model: torch.nn.Module
    processor: Any
    data: Any
    checkpointer: Checkpointer
    stop_request: StopRequest | None

    def request_stop(self, reason: str, *, interrupted: bool) -> None: ...

    def best_weights(self) -> tuple[torch.nn.Module, str]: ...


@dataclass(frozen=True)
class EpochResult:
    """One finished epoch, as the Trainer hands it to every callback."""

    epoch: int
    record: Mapping[str, Any]  # the epoch's metrics.jsonl line
    # COCOeval's arrays and detections behind the record's `map`; None when not evaluated.
    scores: CocoScores | None = None
    is_best: bool = False
    # Pictures drawn this epoch, by tag, as uint8 CHW tensors or image files: a drawing
    # callback adds them, a logger reads them.
    pictures: dict[str, list[torch.Tensor | Path]] = field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        return "map" in self.record

    @property
    def map(self) -> float | None:
        return self.record.get("map")

    def add_pictures(self, tag: str, images: list[torch.Tensor | Path]) -> None:
        self.pictures[tag] = list(images)


@dataclass(frozen=True)
class StopRequest:
    reason: str
    interrupted: bool  # True: cut short, resumable; False: a normal end (e.g. pruned)


class Callback:
    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None: ...

    def on_interrupt(self, trainer: Trainer, where: str) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def close(self) -> None: ...


class EarlyStopping(Callback):
    """Ends the run when validation mAP has not improved by `min_delta` for `patience`
    evaluations. A normal end (a search records the trial COMPLETE); its counter is
    checkpointed, so a resumed run stops where the uninterrupted one would."""

    state_key = "early_stop"

    def __init__(self, patience: int, min_delta: float):
        self.patience = patience
        self.min_delta = min_delta
        self.best = float("-inf")
        self.stale = 0  # evaluations since the last improvement

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if not result.evaluated:
            return
        if result.map > self.best + self.min_delta:
            self.best, self.stale = result.map, 0
        else:
            self.stale += 1
        if self.stale >= self.patience and result.epoch < trainer.epochs:
            log.info("Early stop after epoch %d: mAP has not improved by %g for %d evaluation(s) (best %.4f)",
                     result.epoch, self.min_delta, self.stale, self.best)
            trainer.request_stop("early stop", interrupted=False)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.stale = float(state["best"]), int(state["stale"])


class DataReport(Callback):
    """Before the first step: the data health report (`data.health`) in the log and in
    data_report.json. A resume makes it again from the same data: the same file."""

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            write_report(health_report(trainer.data), trainer.run_dir)


class LogMetrics(Callback):
    """Appends each epoch's record to metrics.jsonl (main process) and narrates it."""

    def on_fit_start(self, trainer: Trainer) -> None:
        # A run killed after logging an epoch but before checkpointing it redoes that epoch.
        if trainer.dist.is_main:
            metrics_log = MetricsLog.of_run(trainer.run_dir)
            remove_temp_files(metrics_log.path.parent)
            dropped = metrics_log.truncate_after(trainer.state.epoch)
            if dropped:
                log.warning("metrics.jsonl had %d epoch(s) newer than the checkpoint; dropped them", dropped)

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if trainer.dist.is_main:
            MetricsLog.of_run(trainer.run_dir).append(dict(result.record))
        log.info(_epoch_line(result, trainer.epochs))
        per_class = result.record.get("map_per_class", {}) if result.evaluated else {}
        if len(per_class) > 1:
            log.info("per-class AP after epoch %d:\n%s", result.epoch, format_per_class_table(per_class))


def _epoch_line(result: EpochResult, epochs: int) -> str:
    record = result.record
    line = (f"epoch {result.epoch}/{epochs}: loss {record.get('train_loss', float('nan')):.4f}, "
            f"size {record['image_size']}, {record['epoch_time']:.1f}s")
    if result.evaluated:
        line += (f", mAP {record['map']:.4f} (AP50 {record['map_50']:.4f}, small {record['map_small']:.4f}, "
                 f"medium {record['map_medium']:.4f}, large {record['map_large']:.4f})")
    return line


class SaveCheckpoints(Callback):
    """last.pt after every epoch (+ every `every_n_steps` steps), best.pt, numbered copies."""

    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.checkpointer.sweep_temp_files()

    def on_step_end(self, trainer: Trainer) -> None:
        state = trainer.state
        unfinished = state.batch_in_epoch < trainer.batches_per_epoch
        if unfinished and self.every_n_steps and state.global_step % self.every_n_steps == 0:
            trainer.checkpointer.save()

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        trainer.checkpointer.save(is_best=result.is_best, epoch_end=result.epoch)

    def on_interrupt(self, trainer: Trainer, where: str) -> None:
        trainer.checkpointer.save()


class StopOnSignal(Callback):
    """SIGTERM/SIGINT/SIGUSR1/2 finish the current step, then the run saves and stops.

    Every rank leaves at the same step, whichever got the signal. When every callback has
    had its say (`close`), the signal is handed to whoever handled it before us (submitit
    then requeues the job).
    """

    def __init__(self) -> None:
        self.stop = GracefulStop()
        self.interrupted = False

    def on_fit_start(self, trainer: Trainer) -> None:
        self.stop.__enter__()

    def _check(self, trainer: Trainer) -> None:
        if collectives.any_rank(self.stop.requested is not None, trainer.dist):
            trainer.request_stop(str(self.stop.requested or "a signal to another rank"), interrupted=True)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.batch_in_epoch < trainer.batches_per_epoch:
            self._check(trainer)

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        # A signal during the last epoch lets the run finish: nothing is left to resume.
        if result.epoch < trainer.epochs:
            self._check(trainer)

    def on_interrupt(self, trainer: Trainer, where: str) -> None:
        log.warning("Stopped by %s %s; checkpoint saved. Resume with:  detr-train training.resume=%s",
                    trainer.stop_request.reason, where, trainer.run_dir)
        self.interrupted = True

    def close(self) -> None:
        if self.interrupted:
            self.stop.hand_over()
        self.stop.__exit__(None, None, None)


class CheckReplicas(Callback):
    """Compares the parameters of all DDP ranks every `every` steps (a debugging aid)."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.global_step % self.every == 0:
            collectives.check_replicas(trainer.model, trainer.dist, trainer.state.global_step)


class ExportHF(Callback):
    """`save_pretrained` of the weights that scored best (raw or EMA, from best.pt) and the
    image processor into <run dir>/hf_model at the end; the final weights when nothing was scored."""

    FOLDER = "hf_model"

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        problem = hf_export_problem(trainer.cfg.model)
        if problem is not None:
            log.error("Not exported: %s", problem)
            return
        model, which = trainer.best_weights()
        target = save_pretrained_folder(model, trainer.processor, trainer.cfg.model, trainer.run_dir / self.FOLDER)
        log.info("Exported %s and the image processor to %s", which, target)


@dataclass
class CallbackList:
    callbacks: list[Callback] = field(default_factory=list)

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)
