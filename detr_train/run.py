"""One training run: data, model, optimiser, the epoch loop, checkpoints, metrics.

`run(cfg, run_dir)` takes a plain config and a folder; it never touches Hydra. It
returns the best validation mAP, which is also a search's objective.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from detr_train import checkpoint as ckpt
from detr_train import distributed
from detr_train.data.coco import CocoDetectionDataset
from detr_train.data.collate import DetrCollator
from detr_train.data.sampling import EpochBatchSampler, select_training_images
from detr_train.data.sources import DatasetError, prepare_dataset
from detr_train.distributed import SINGLE_PROCESS, DistContext
from detr_train.engine import LossMeter, StepSettings, evaluate, train_one_epoch
from detr_train.evaluation import format_per_class_table, load_coco_ground_truth
from detr_train.metrics_log import MetricsLog
from detr_train.model import build_image_processor, build_model
from detr_train.optim import build_optimizer, build_scheduler
from detr_train.precision import keep_deformable_attention_fp32, resolve_precision
from detr_train.resize import size_for_epoch, validate_resize_schedule
from detr_train.resume import ResumeTarget
from detr_train.rundir import save_resumed_config
from detr_train.search.reporter import reporter_for
from detr_train.signals import GracefulStop

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class Progress:
    """Where the run stands; everything here goes into checkpoints."""

    epoch: int = 0  # last fully completed epoch
    batch_in_epoch: int = 0  # batches done in the current (epoch + 1) epoch
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"training.device={name!r} but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress_bars(setting) -> bool:
    if setting == "auto":
        import sys

        return sys.stderr.isatty()
    return bool(setting)


def _cap(value, cap):
    return value if cap is None else min(value, int(cap))


def epochs_to_train(cfg: DictConfig) -> int:
    """The run's length: `training.epochs`, capped by the search budget."""
    return _cap(int(cfg.training.epochs), cfg.budget.max_epochs)


@dataclass
class DataBundle:
    train: CocoDetectionDataset
    val: CocoDetectionDataset
    val_ann: Path
    class_names: list[str]


def build_data(cfg: DictConfig) -> DataBundle:
    train_cfg, data_cfg, budget = cfg.training, cfg.data, cfg.budget
    paths = prepare_dataset(data_cfg)
    overfit = bool(train_cfg.overfit)
    full_train = CocoDetectionDataset(
        paths.train_images, paths.train_ann, augment=not overfit and float(data_cfg.hflip_prob) > 0,
        hflip_prob=float(data_cfg.hflip_prob), seed=int(train_cfg.seed), default_size=int(data_cfg.image_size),
    )
    train_ids = select_training_images(
        full_train.image_ids,
        subset_size=None if train_cfg.subset_size is None else int(train_cfg.subset_size),
        subset_seed=int(train_cfg.subset_seed),
        overfit=overfit,
        overfit_size=int(train_cfg.overfit_size),
        budget_cap=budget.max_train_images,
        source=f"training set {paths.train_ann}",
    )
    train = full_train.subset(train_ids)
    if overfit:
        # Overfit mode scores the very images it trains on, unaugmented.
        val = full_train.subset(train_ids)
        val.augment = False
        val_ann = paths.train_ann
    else:
        full_val = CocoDetectionDataset(paths.val_images, paths.val_ann, default_size=int(data_cfg.eval_size))
        if full_val.categories.category_ids != full_train.categories.category_ids:
            raise DatasetError(
                f"{paths.val_ann} and {paths.train_ann} define different categories "
                f"({full_val.categories.category_ids} vs {full_train.categories.category_ids})"
            )
        limit = train_cfg.val_subset_size
        limit = budget.max_val_images if limit is None else _cap(int(limit), budget.max_val_images)
        val = full_val if limit is None else full_val.subset(full_val.image_ids[: int(limit)])
        val_ann = paths.val_ann
    log.info("Data: %d training images, %d evaluation images, %d classes",
             len(train), len(val), len(full_train.categories))
    return DataBundle(train, val, val_ann, list(full_train.categories.names))


def _loader(dataset, batch_sampler, collator, data_cfg, seed: int, device: torch.device) -> DataLoader:
    workers = int(data_cfg.num_workers)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collator,
        num_workers=workers,
        persistent_workers=workers > 0 and bool(data_cfg.get("persistent_workers", False)),
        pin_memory=device.type == "cuda",
        # Worker seeds come from this generator, not the global RNG, so creating an
        # iterator never shifts the training RNG stream (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )


class Trainer:
    """Holds the stateful parts of a run and the checkpoint contract between them."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dist_ctx: DistContext = SINGLE_PROCESS):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dist = dist_ctx
        train_cfg = cfg.training
        self.resize_schedule = validate_resize_schedule(
            OmegaConf.to_container(train_cfg.resize_schedule) if train_cfg.resize_schedule is not None else None
        )
        self.epochs = epochs_to_train(cfg)
        self.device = distributed.device_for(dist_ctx, resolve_device(str(train_cfg.device)))
        # The same seed on every rank: identical initial weights and augmentation streams.
        seed_everything(int(train_cfg.seed))
        # Rank 0 generates/converts the dataset and fills the weight cache; the others reuse them.
        with distributed.main_first(dist_ctx):
            self.data = build_data(cfg)
            self.model = build_model(cfg.model, self.data.class_names).to(self.device)
        self.processor = build_image_processor(int(cfg.data.eval_size), float(cfg.data.max_size_ratio))
        self.precision = resolve_precision(bool(train_cfg.amp), str(train_cfg.amp_dtype), self.device)
        if self.precision.enabled:
            keep_deformable_attention_fp32(self.model)
        # What the training step calls: the DDP wrapper (which averages gradients) or the model itself.
        self.train_model = distributed.wrap_ddp(
            self.model, dist_ctx, self.device,
            find_unused_parameters=bool(OmegaConf.select(cfg, "training.ddp.find_unused_parameters", default=False)),
        )
        collator = DetrCollator(self.processor, float(cfg.data.max_size_ratio))
        self.train_sampler = EpochBatchSampler(
            len(self.data.train), int(train_cfg.batch_size), shuffle=not bool(train_cfg.overfit),
            seed=int(train_cfg.seed),
            size_for_epoch=lambda e: size_for_epoch(self.resize_schedule, e, int(cfg.data.image_size)),
            rank=dist_ctx.rank, world_size=dist_ctx.world_size,
        )
        eval_size = int(cfg.data.eval_size)
        # Evaluation shards are not padded: a repeated image would count twice in COCOeval.
        self.val_sampler = EpochBatchSampler(
            len(self.data.val), int(train_cfg.batch_size), shuffle=False, seed=0, size_for_epoch=lambda e: eval_size,
            rank=dist_ctx.rank, world_size=dist_ctx.world_size, pad=False,
        )
        self.train_loader = _loader(self.data.train, self.train_sampler, collator, cfg.data, int(train_cfg.seed), self.device)
        self.val_loader = _loader(self.data.val, self.val_sampler, collator, cfg.data, int(train_cfg.seed), self.device)
        self.steps_per_epoch = self.train_sampler.batches_per_epoch()
        self.optimizer = build_optimizer(self.model, train_cfg)
        self.scheduler = build_scheduler(
            self.optimizer, train_cfg, total_steps=self.epochs * self.steps_per_epoch, steps_per_epoch=self.steps_per_epoch
        )
        self.progress = Progress()
        self.meter = LossMeter()
        self.coco_gt = load_coco_ground_truth(self.data.val_ann)
        self.metrics_log = MetricsLog(self.run_dir / METRICS_FILE)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.settings = StepSettings(
            grad_clip=float(train_cfg.grad_clip), nonfinite=str(train_cfg.nonfinite),
            max_nonfinite_steps=int(train_cfg.max_nonfinite_steps), log_every=int(train_cfg.log_every),
            progress=_progress_bars(train_cfg.progress),
        )
        if self.settings.nonfinite not in ("skip", "stop"):
            raise ValueError(f"training.nonfinite must be skip or stop, got {self.settings.nonfinite!r}")

    # --- checkpoint contract

    def state_payload(self) -> dict:
        return {
            ckpt.KEY_FORMAT_VERSION: ckpt.FORMAT_VERSION,
            ckpt.KEY_MODEL: self.model.state_dict(),
            ckpt.KEY_OPTIMIZER: self.optimizer.state_dict(),
            ckpt.KEY_LR_SCHEDULER: self.scheduler.state_dict(),
            ckpt.KEY_GRAD_SCALER: self.precision.scaler.state_dict(),
            ckpt.KEY_EPOCH: self.progress.epoch,
            ckpt.KEY_BATCH_IN_EPOCH: self.progress.batch_in_epoch,
            ckpt.KEY_GLOBAL_STEP: self.progress.global_step,
            ckpt.KEY_BEST_METRIC: self.progress.best_metric,
            ckpt.KEY_BEST_EPOCH: self.progress.best_epoch,
            ckpt.KEY_LOSS_METER: self.meter.state_dict(),
            ckpt.KEY_RNG: ckpt.capture_rng_state(),
            ckpt.KEY_CONFIG_YAML: OmegaConf.to_yaml(self.cfg, resolve=True),
            ckpt.KEY_CLASS_NAMES: list(self.data.class_names),
            ckpt.KEY_WORLD_SIZE: self.dist.world_size,
            ckpt.KEY_EFFECTIVE_BATCH_SIZE: int(self.cfg.training.batch_size) * self.dist.world_size,
        }

    def restore(self, target: ResumeTarget) -> None:
        payload = target.payload
        saved_classes = payload.get(ckpt.KEY_CLASS_NAMES)
        if saved_classes is not None and list(saved_classes) != self.data.class_names:
            raise ckpt.CheckpointError(
                f"checkpoint {target.checkpoint} was trained on classes {list(saved_classes)}, "
                f"but the dataset has {self.data.class_names}"
            )
        ckpt.load_model_state(self.model, payload[ckpt.KEY_MODEL], target.checkpoint)
        self.optimizer.load_state_dict(payload[ckpt.KEY_OPTIMIZER])
        self.scheduler.load_state_dict(payload[ckpt.KEY_LR_SCHEDULER])
        self.precision.scaler.load_state_dict(payload[ckpt.KEY_GRAD_SCALER])
        self.progress = Progress(
            epoch=int(payload[ckpt.KEY_EPOCH]), batch_in_epoch=int(payload[ckpt.KEY_BATCH_IN_EPOCH]),
            global_step=int(payload[ckpt.KEY_GLOBAL_STEP]), best_metric=float(payload[ckpt.KEY_BEST_METRIC]),
            best_epoch=int(payload[ckpt.KEY_BEST_EPOCH]),
        )
        if self.progress.batch_in_epoch and ckpt.KEY_LOSS_METER in payload:
            self.meter.load_state_dict(payload[ckpt.KEY_LOSS_METER])
        ckpt.restore_rng_state(payload[ckpt.KEY_RNG])
        saved_world_size = int(payload.get(ckpt.KEY_WORLD_SIZE, 1))
        if saved_world_size != self.dist.world_size:
            self._continue_with_another_world_size(saved_world_size)
        dropped = self.metrics_log.truncate_after(self.progress.epoch) if self.dist.is_main else 0
        if dropped:
            log.warning("metrics.jsonl had %d epoch(s) newer than the checkpoint; dropped them", dropped)
        where = (f"epoch {self.progress.epoch + 1}, batch {self.progress.batch_in_epoch}"
                 if self.progress.batch_in_epoch else f"the start of epoch {self.progress.epoch + 1}")
        log.info("Resumed from %s (global step %d); continuing at %s", target.checkpoint, self.progress.global_step, where)

    def _continue_with_another_world_size(self, saved_world_size: int) -> None:
        """Map the position in the epoch and the LR schedule onto this run's steps per epoch.

        Every rank walks its strided share of one global order per epoch, so `b` batches
        on `n` ranks have used the first b x batch x n images of that order, whatever `n` is.
        """
        batch_size = int(self.cfg.training.batch_size)
        used = self.progress.batch_in_epoch * batch_size * saved_world_size
        batch_in_epoch = min(used // (batch_size * self.dist.world_size), self.steps_per_epoch)
        step = self.progress.epoch * self.steps_per_epoch + batch_in_epoch
        log.warning(
            "resume: the checkpoint was written by %d process(es) (effective batch %d), this run has %d "
            "(effective batch %d); continuing epoch %d at batch %d of %d and the LR schedule at step %d "
            "(was %d). The learning rate is not rescaled.",
            saved_world_size, batch_size * saved_world_size, self.dist.world_size, batch_size * self.dist.world_size,
            self.progress.epoch + 1, batch_in_epoch, self.steps_per_epoch, step, self.progress.global_step,
        )
        self.progress.batch_in_epoch, self.progress.global_step = batch_in_epoch, step
        move_scheduler_to(self.scheduler, step)

    def save(self, *, is_best: bool = False, numbered: bool = False) -> Path | None:
        if not self.dist.is_main:
            return None
        last = ckpt.save_checkpoint(self.checkpoint_dir / ckpt.LAST, self.state_payload())
        # Real copies, not links: they are the fallback when last.pt itself gets damaged.
        if is_best:
            _copy_atomically(last, self.checkpoint_dir / ckpt.BEST)
        if numbered and int(self.cfg.training.checkpoint.keep_last) > 0:
            _copy_atomically(last, self.checkpoint_dir / ckpt.numbered_name(self.progress.epoch))
            ckpt.prune_numbered(self.checkpoint_dir, int(self.cfg.training.checkpoint.keep_last))
        return last

    # --- the loop

    def _should_evaluate(self, epoch: int) -> bool:
        every = max(1, int(self.cfg.training.eval_every))
        return epoch % every == 0 or epoch == self.epochs

    def fit(self) -> float:
        # A no-op outside a search; inside one, it talks to the trial in the study's storage.
        reporter = reporter_for(self.cfg.get("trial") if self.dist.is_main else None)
        every_n_steps = int(self.cfg.training.checkpoint.every_n_steps)
        # select(): configs saved before the ddp keys existed lack them.
        check_replicas_every = int(OmegaConf.select(self.cfg, "training.ddp.check_replicas_every", default=0) or 0)
        with GracefulStop() as stop:
            for epoch in range(self.progress.epoch + 1, self.epochs + 1):
                start_batch = self.progress.batch_in_epoch
                if start_batch == 0:
                    self.meter = LossMeter()
                image_size = size_for_epoch(self.resize_schedule, epoch, int(self.cfg.data.image_size))
                self.train_sampler.set_epoch(epoch, start_batch)
                lr = self.optimizer.param_groups[0]["lr"]
                started = time.perf_counter()

                def step_hook(batch_index: int) -> bool:
                    self.progress.global_step += 1
                    self.progress.batch_in_epoch = batch_index + 1
                    unfinished = batch_index + 1 < self.steps_per_epoch
                    if check_replicas_every and self.progress.global_step % check_replicas_every == 0:
                        distributed.check_replicas(self.model, self.dist, self.progress.global_step)
                    if unfinished and every_n_steps and self.progress.global_step % every_n_steps == 0:
                        self.save()
                    # Every rank must leave the epoch at the same step, whichever got the signal.
                    return distributed.any_rank(stop.requested is not None, self.dist) and unfinished

                train_metrics = train_one_epoch(
                    self.train_model, self.train_loader, self.optimizer, self.scheduler, self.precision, self.device,
                    self.settings, self.meter, epoch=epoch, first_batch=start_batch,
                    total_batches=self.steps_per_epoch, step_hook=step_hook,
                    any_rank=lambda flag: distributed.any_rank(flag, self.dist),
                    backward_on_skip=self.dist.enabled,
                )
                if self.progress.batch_in_epoch < self.steps_per_epoch:
                    self.save()
                    self._stop_for_signal(
                        stop, reporter, f"at epoch {epoch}, batch {self.progress.batch_in_epoch}/{self.steps_per_epoch}"
                    )
                    return max(self.progress.best_metric, 0.0)
                self.progress.epoch, self.progress.batch_in_epoch = epoch, 0
                record = {"epoch": epoch, "global_step": self.progress.global_step, "lr": lr,
                          "image_size": image_size, **train_metrics}
                metrics = None
                if self._should_evaluate(epoch):
                    metrics = evaluate(
                        self.model, self.val_loader, self.processor, self.precision, self.device, self.coco_gt,
                        self.data.val.image_ids, self.data.train.categories.category_id,
                        progress=self.settings.progress, dist_ctx=self.dist,
                    )
                    record.update(metrics)
                record["epoch_time"] = time.perf_counter() - started
                is_best = metrics is not None and metrics["map"] > self.progress.best_metric
                if is_best:
                    self.progress.best_metric, self.progress.best_epoch = metrics["map"], epoch
                if self.dist.is_main:
                    self.metrics_log.append(record)
                self._log_epoch(record, metrics)
                self.save(is_best=is_best, numbered=True)
                if metrics is not None:
                    reporter.report(epoch, metrics["map"])
                    # After the last epoch there is nothing left to save: a prune there (a
                    # successive-halving rung can fall on it) would only discard a finished result.
                    if epoch < self.epochs and distributed.broadcast_from_main(reporter.should_prune(), self.dist):
                        log.info("Trial pruned by the search after epoch %d (mAP %.4f)", epoch, metrics["map"])
                        break
                if distributed.any_rank(stop.requested is not None, self.dist) and epoch < self.epochs:
                    self._stop_for_signal(stop, reporter, f"after epoch {epoch}")
                    break
        if bool(self.cfg.training.export_hf) and self.dist.is_main:
            self.export_hf()
        log.info("Best validation mAP %.4f at epoch %d", self.progress.best_metric, self.progress.best_epoch)
        return max(self.progress.best_metric, 0.0)

    def _stop_for_signal(self, stop: GracefulStop, reporter, where: str) -> None:
        """After the checkpoint: tell the trial, say how to resume, pass the signal on (submitit requeues)."""
        reason = str(stop.requested or "a signal to another rank")
        reporter.interrupted(reason)
        log.warning("Stopped by %s %s; checkpoint saved. Resume with:\n  detr-train training.resume=%s",
                    reason, where, self.run_dir)
        stop.hand_over()

    def _log_epoch(self, record: dict, metrics: dict | None) -> None:
        line = (f"epoch {record['epoch']}/{self.epochs}: loss {record.get('train_loss', float('nan')):.4f}, "
                f"size {record['image_size']}, {record['epoch_time']:.1f}s")
        if metrics is not None:
            line += (f", mAP {metrics['map']:.4f} (AP50 {metrics['map_50']:.4f}, small {metrics['map_small']:.4f}, "
                     f"medium {metrics['map_medium']:.4f}, large {metrics['map_large']:.4f})")
        log.info(line)
        if metrics is not None and len(metrics.get("map_per_class", {})) > 1:
            log.info("per-class AP after epoch %d:\n%s", record["epoch"], format_per_class_table(metrics["map_per_class"]))

    def export_hf(self) -> Path:
        target = self.run_dir / "hf_model"
        self.model.save_pretrained(target)
        self.processor.save_pretrained(target)
        log.info("Exported model and image processor to %s", target)
        return target


def _copy_atomically(source: Path, destination: Path) -> None:
    tmp = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    with tmp.open("rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, destination)


def move_scheduler_to(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a LambdaLR at `step` and set the learning rates it gives there."""
    scheduler.last_epoch = step
    for group, factor, base_lr in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs):
        group["lr"] = base_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def run(
    cfg: DictConfig, run_dir: Path, resume: ResumeTarget | None = None, dist_ctx: DistContext = SINGLE_PROCESS
) -> float:
    """Train as configured, writing into `run_dir` (rank 0 only); returns the best validation mAP."""
    trainer = Trainer(cfg, run_dir, dist_ctx)
    if resume is not None:
        trainer.restore(resume)
        # Only a resume that loaded adds anything to the run directory.
        if dist_ctx.is_main:
            save_resumed_config(run_dir, cfg)
    return trainer.fit()
