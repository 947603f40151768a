"""What happens around the training loop, as callbacks the Trainer calls in list order.

Hooks (each optional):
    on_fit_start(trainer)                 once, after a resume has been loaded
    on_step_end(trainer)                  after every optimiser step
    on_epoch_end(trainer, result)         after every completed epoch; `result.record` is the
                                          epoch's metrics.jsonl line, filled in as it goes
    on_interrupt(trainer, where)          the run stops before its end (a signal): save, tell
    on_fit_end(trainer)                   the run finished (or was pruned)
    close()                               always, last

A callback ends the run with `trainer.request_stop(reason, interrupted=...)`: pruning is
a normal end, a signal an interruption (the run can be resumed). The first request wins.
The search package builds its own callbacks; nothing here knows about searches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from detr_train import distributed
from detr_train.atomic import remove_temp_files
from detr_train.checkpointer import Checkpointer
from detr_train.evaluation import CocoScores, format_per_class_table
from detr_train.metrics_log import MetricsLog
from detr_train.model import uses_swapped_group_norm
from detr_train.signals import GracefulStop

if TYPE_CHECKING:
    from detr_train.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    epoch: int
    record: dict[str, Any]
    started: float = 0.0  # perf_counter() when the epoch began
    metrics: dict[str, Any] | None = None  # validation metrics, when this epoch was evaluated
    # COCOeval's arrays behind `metrics` (precision for PR curves); None when not evaluated.
    scores: CocoScores | None = None
    is_best: bool = False


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


class Evaluate(Callback):
    """Scores the model every `every` epochs and after the last one; tracks the best mAP.

    With EMA weights, they are what is scored (the record's `map`, what a search and early
    stopping see); `also_raw` scores the raw weights too, logged as `raw_map`, ... The best
    mAP is the better of the two, and the state remembers which weights reached it.
    """

    def __init__(self, every: int, *, also_raw: bool = False):
        self.every = max(1, every)
        self.also_raw = also_raw

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        if result.epoch % self.every and result.epoch != trainer.epochs:
            return
        primary = "model" if trainer.ema is None else "ema"
        result.metrics = trainer.evaluate(primary)
        # Kept now: scoring the raw weights below replaces the evaluator's last scores.
        result.scores = trainer.evaluator.last_scores
        result.record.update(result.metrics)
        scores = {primary: result.metrics["map"]}
        if primary == "ema" and self.also_raw:
            raw = trainer.evaluate("model")
            result.record.update({f"raw_{key}": value for key, value in raw.items()})
            scores["model"] = raw["map"]
        weights = max(scores, key=scores.get)
        result.is_best = trainer.state.observe(result.epoch, scores[weights], weights)


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
        if result.metrics is None:
            return
        value = result.metrics["map"]
        if value > self.best + self.min_delta:
            self.best, self.stale = value, 0
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


class LogMetrics(Callback):
    """Appends each epoch's record to metrics.jsonl (main process) and narrates it."""

    def __init__(self, metrics_log: MetricsLog, dist: distributed.DistContext):
        self.metrics_log = metrics_log
        self.dist = dist

    def on_fit_start(self, trainer: Trainer) -> None:
        # A run killed after logging an epoch but before checkpointing it redoes that epoch.
        if self.dist.is_main:
            remove_temp_files(self.metrics_log.path.parent)
            dropped = self.metrics_log.truncate_after(trainer.state.epoch)
            if dropped:
                log.warning("metrics.jsonl had %d epoch(s) newer than the checkpoint; dropped them", dropped)

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        result.record["epoch_time"] = time.perf_counter() - result.started
        if self.dist.is_main:
            self.metrics_log.append(result.record)
        log.info(_epoch_line(result, trainer.epochs))
        per_class = (result.metrics or {}).get("map_per_class", {})
        if len(per_class) > 1:
            log.info("per-class AP after epoch %d:\n%s", result.epoch, format_per_class_table(per_class))


def _epoch_line(result: EpochResult, epochs: int) -> str:
    record, metrics = result.record, result.metrics
    line = (f"epoch {result.epoch}/{epochs}: loss {record.get('train_loss', float('nan')):.4f}, "
            f"size {record['image_size']}, {record['epoch_time']:.1f}s")
    if metrics is not None:
        line += (f", mAP {metrics['map']:.4f} (AP50 {metrics['map_50']:.4f}, small {metrics['map_small']:.4f}, "
                 f"medium {metrics['map_medium']:.4f}, large {metrics['map_large']:.4f})")
    return line


class SaveCheckpoints(Callback):
    """last.pt after every epoch (+ every `every_n_steps` steps), best.pt, numbered copies."""

    def __init__(self, checkpointer: Checkpointer, every_n_steps: int):
        self.checkpointer = checkpointer
        self.every_n_steps = every_n_steps

    def on_step_end(self, trainer: Trainer) -> None:
        state = trainer.state
        unfinished = state.batch_in_epoch < trainer.batches_per_epoch
        if unfinished and self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self.checkpointer.save()

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        self.checkpointer.save(is_best=result.is_best, epoch_end=result.epoch)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.checkpointer.sweep_temp_files()

    def on_interrupt(self, trainer: Trainer, where: str) -> None:
        self.checkpointer.save()


class StopOnSignal(Callback):
    """SIGTERM/SIGINT/SIGUSR1/2 finish the current step, then the run saves and stops.

    Every rank leaves at the same step, whichever got the signal. After the checkpoint the
    signal is handed to whoever handled it before us (submitit then requeues the job).
    """

    def __init__(self, dist: distributed.DistContext):
        self.dist = dist
        self.stop = GracefulStop()

    def on_fit_start(self, trainer: Trainer) -> None:
        self.stop.__enter__()

    def _check(self, trainer: Trainer) -> None:
        if distributed.any_rank(self.stop.requested is not None, self.dist):
            trainer.request_stop(str(self.stop.requested or "a signal to another rank"), interrupted=True)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.batch_in_epoch < trainer.batches_per_epoch:
            self._check(trainer)

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        # A signal during the last epoch lets the run finish: nothing is left to resume.
        if result.epoch < trainer.epochs:
            self._check(trainer)

    def on_interrupt(self, trainer: Trainer, where: str) -> None:
        log.warning("Stopped by %s %s; checkpoint saved. Resume with:\n  detr-train training.resume=%s",
                    trainer.stop_request.reason, where, trainer.run_dir)
        self.stop.hand_over()

    def close(self) -> None:
        self.stop.__exit__(None, None, None)


class CheckReplicas(Callback):
    """Compares the parameters of all DDP ranks every `every` steps (a debugging aid)."""

    def __init__(self, every: int, dist: distributed.DistContext):
        self.every = every
        self.dist = dist

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.global_step % self.every == 0:
            distributed.check_replicas(trainer.model, self.dist, trainer.state.global_step)


class ExportHF(Callback):
    """`save_pretrained` of the weights that scored best (raw or EMA, from best.pt) and the
    image processor into <run dir>/hf_model at the end; the final weights when nothing was scored."""

    FOLDER = "hf_model"

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        if uses_swapped_group_norm(trainer.cfg.model):
            log.error("Not exported: this model's backbone (model.backbone.type=resnet with norm=group_norm, the first "
                      "release's from-scratch backbone) cannot be rebuilt by from_pretrained; train with "
                      "model.backbone.type=bit to export")
            return
        target = trainer.run_dir / self.FOLDER
        model, which = trainer.best_weights()
        model.save_pretrained(target)
        trainer.processor.save_pretrained(target)
        log.info("Exported %s and the image processor to %s", which, target)


@dataclass
class CallbackList:
    callbacks: list[Callback] = field(default_factory=list)

    def emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)
