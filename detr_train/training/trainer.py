"""One training run: the Trainer builds the parts, loads a resume plan, and runs the loop.

`run(plan, dist, callbacks)` takes a resume plan (config, run directory, checkpoint) and
never touches Hydra; it returns the best validation mAP, which is also a search's
objective. The Trainer trains and evaluates; everything else around the loop (metric log,
checkpoints, signals, export, pictures, search reporting) is a callback that whoever
builds the run passes in (`detr_train.cli.callbacks` builds the command line's).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from detr_train.checkpointing.checkpointer import Checkpointer, Found
from detr_train.checkpointing.format import (
    FORMAT_VERSION,
    KEY_CLASS_NAMES,
    KEY_CONFIG_YAML,
    KEY_FORMAT_VERSION,
    KEY_MODEL_CONFIG,
    STATE_EMA,
    STATE_GRAD_SCALER,
    STATE_MODEL,
    STATE_OPTIMIZER,
    STATE_RNG,
    STATE_TRAIN,
    load_checkpoint,
)
from detr_train.checkpointing.plan import Plan
from detr_train.checkpointing.rundir import save_resumed_config
from detr_train.checkpointing.state import RngState, StepLayout, StrictWeights, TrainState
from detr_train.config.resize_schedule import validate_resize_schedule
from detr_train.config.schema import Config
from detr_train.data.build import build_data, capped, evaluation_sampler, make_loader, training_sampler
from detr_train.data.collate import DetrCollator
from detr_train.distributed import collectives as distributed
from detr_train.distributed.launch import SINGLE_PROCESS, DistContext
from detr_train.evaluation.coco import CocoScores, load_coco_ground_truth
from detr_train.evaluation.evaluator import Evaluation, Evaluator
from detr_train.evaluation.slicing import SliceSettings, sliced_collator
from detr_train.modeling.build import build_image_processor, build_model
from detr_train.modeling.fast_paths import apply_fast_paths
from detr_train.modeling.precision import resolve_precision
from detr_train.training import callbacks as cb
from detr_train.training.ema import ModelEMA
from detr_train.training.loop import EpochPlan, NonFiniteGuard, TrainStep, train_one_epoch
from detr_train.training.optim import LRSchedule, build_optimizer
from detr_train.training.resize import size_for_epoch
from detr_train.training.runtime import resolve_device, show_progress

log = logging.getLogger(__name__)

def epochs_to_train(cfg: Config) -> int:
    """The run's length: `training.epochs`, capped by the budget."""
    return capped(cfg.training.epochs, cfg.budget.max_epochs)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, dist: DistContext = SINGLE_PROCESS,
                 callbacks: Sequence[cb.Callback] = (), architecture: dict | None = None):
        self.cfg, self.run_dir, self.dist = cfg, Path(run_dir), dist
        train_cfg = cfg.training
        self.resize_schedule = validate_resize_schedule(OmegaConf.to_container(train_cfg.resize_schedule)
                                                        if train_cfg.resize_schedule is not None else None)
        self.epochs = epochs_to_train(cfg)
        self.device = distributed.device_for(dist, resolve_device(train_cfg.device))
        # The same seed on every rank: identical initial weights and augmentation streams.
        set_seed(train_cfg.seed)
        # Rank 0 generates/converts the dataset and fills the weight cache; the others reuse them.
        with distributed.main_first(dist):
            self.data = build_data(cfg.data, train_cfg, cfg.budget)
            self.model = build_model(cfg.model, self.data.class_names, architecture=architecture).to(self.device)
        self.processor = build_image_processor(cfg.data.eval_size, cfg.data.max_size_ratio)
        self.fast_paths = apply_fast_paths(self.model, cfg.model, train_cfg, self.device)
        ema_cfg = train_cfg.ema
        self.ema = ModelEMA(self.model, decay=ema_cfg.decay, warmup_steps=ema_cfg.warmup_steps) if ema_cfg.enabled else None
        self.precision = resolve_precision(train_cfg.amp, train_cfg.amp_dtype, self.device)
        self.slicing = SliceSettings.from_training(train_cfg)
        self._build_loaders()
        self._build_optimisation()
        self.state = TrainState(layout=self.layout)
        self.callbacks = cb.CallbackList(list(callbacks))
        self.checkpointer = self._build_checkpointer()
        self.checkpointer.collect(self.callbacks.callbacks)
        self.stop_request: cb.StopRequest | None = None

    def _build_loaders(self) -> None:
        cfg, data = self.cfg, self.data
        collator = DetrCollator(self.processor, cfg.data.max_size_ratio)
        self.train_sampler = training_sampler(len(data.train), cfg.training, self._training_size, self.dist,
                                              data.repeat_factors)
        val_sampler = evaluation_sampler(len(data.val), cfg.training.batch_size, cfg.data.eval_size, self.dist)
        seed = cfg.training.seed
        self.train_loader = make_loader(data.train, self.train_sampler, collator, cfg.data, seed, self.device)
        # Sliced evaluation: the validation batches also carry each image's tiles, cut in the workers.
        val_collator = sliced_collator(collator, self.processor, self.slicing, cfg.training.batch_size)
        self.val_loader = make_loader(data.val, val_sampler, val_collator, cfg.data, seed, self.device)
        # With repeat-factor sampling each epoch has its own length. The LR schedule (a pure
        # function of the optimiser step: its total steps, a step schedule's epoch boundaries)
        # and a resume under another world size need one fixed epoch length: they use the
        # expected one (the sum of the repeat factors, rounded), so the cosine ends within a
        # few steps of the last one and then holds its floor. Otherwise every epoch's.
        self.layout = StepLayout(self.dist.world_size, cfg.training.batch_size,
                                 self.train_sampler.expected_batches_per_epoch(), cfg.training.accumulate_steps)
        self.steps_per_epoch = self.layout.steps_per_epoch
        log.info("Effective batch %d (%d per process x %d accumulation steps x %d processes), %d optimiser steps "
                 "per epoch", self.layout.effective_batch_size, cfg.training.batch_size, cfg.training.accumulate_steps,
                 self.dist.world_size, self.steps_per_epoch)

    @property
    def batches_per_epoch(self) -> int:
        """Loader batches per process in the epoch being trained (with repeat factors, its own length)."""
        return self.train_sampler.batches_per_epoch()

    def _training_size(self, epoch: int) -> int:
        # Native-resolution tiles (data/augment=tiles) are never resized: their side is the training size.
        augmenter = self.data.train.augmenter
        if augmenter is not None and augmenter.tile_size is not None:
            return augmenter.tile_size
        return size_for_epoch(self.resize_schedule, epoch, self.cfg.data.image_size)

    def _build_optimisation(self) -> None:
        train_cfg = self.cfg.training
        # What the step calls: the DDP wrapper (which averages gradients) or the model itself.
        train_model = distributed.wrap_ddp(self.model, self.dist, self.device,
                                           find_unused_parameters=train_cfg.ddp.find_unused_parameters)
        self.optimizer = build_optimizer(self.model, train_cfg, fused=self.fast_paths.fused_optimizer)
        self.schedule = LRSchedule(self.optimizer, train_cfg.schedule, total_steps=self.epochs * self.steps_per_epoch,
                                   steps_per_epoch=self.steps_per_epoch)
        self.step = TrainStep(
            train_model, self.optimizer, self.schedule, self.precision, grad_clip=train_cfg.grad_clip,
            nonfinite=NonFiniteGuard(train_cfg.nonfinite, train_cfg.max_nonfinite_steps), device=self.device,
            dist=self.dist, criterion=self.fast_paths.criterion, channels_last=self.fast_paths.channels_last,
            ema=self.ema,
        )
        self.evaluator = Evaluator(
            self.processor, self.precision, self.device, load_coco_ground_truth(self.data.val_ann),
            self.data.val.image_ids, self.data.train.categories.category_id, dist=self.dist,
            progress=show_progress(train_cfg.progress), slicing=self.slicing,
        )

    def _build_checkpointer(self) -> Checkpointer:
        states = {STATE_MODEL: StrictWeights(self.model), STATE_OPTIMIZER: self.optimizer,
                  STATE_GRAD_SCALER: self.precision.scaler, STATE_TRAIN: self.state, STATE_RNG: RngState()}
        metadata = {KEY_FORMAT_VERSION: FORMAT_VERSION, KEY_CONFIG_YAML: OmegaConf.to_yaml(self.cfg, resolve=True),
                    KEY_CLASS_NAMES: list(self.data.class_names), KEY_MODEL_CONFIG: self.model.config.to_json_string()}
        checkpointer = Checkpointer(self.run_dir, states, metadata, self.dist,
                                    keep_last=self.cfg.training.checkpoint.keep_last)
        if self.ema is not None:
            # A checkpoint from before EMA was switched on: the average starts at the restored weights.
            checkpointer.register(STATE_EMA, self.ema, on_missing=self.ema.reset)
        return checkpointer

    # --- resume and the loop

    def restore(self, found: Found) -> None:
        self.checkpointer.restore(found.payload, found.path)
        self.checkpointer.repair_best(found)
        state = self.state
        where = (f"epoch {state.epoch + 1}, batch {state.batch_in_epoch}" if state.batch_in_epoch
                 else f"the start of epoch {state.epoch + 1}")
        log.info("Resumed from %s (global step %d); continuing at %s", found.path, state.global_step, where)

    def request_stop(self, reason: str, *, interrupted: bool) -> None:
        if self.stop_request is None:
            self.stop_request = cb.StopRequest(reason, interrupted)

    def evaluate(self, weights: str = "model") -> Evaluation:
        """Validation scores of the raw weights ("model") or of their moving average ("ema")."""
        return self.evaluator(self.ema.module if weights == "ema" else self.model, self.val_loader)

    def best_weights(self) -> tuple[torch.nn.Module, str]:
        """A model holding the weights that scored best (from best.pt), and what they are."""
        state = self.state
        if state.best_epoch == 0 or not self.checkpointer.best.is_file():
            return self.model, "the final weights"
        payload = load_checkpoint(self.checkpointer.best)
        weights = payload[STATE_EMA]["weights"] if state.best_weights == "ema" else payload[STATE_MODEL]
        model = copy.deepcopy(self.model)
        model.load_state_dict(weights)
        return model, f"the {state.best_weights} weights of epoch {state.best_epoch} (mAP {state.best_metric:.4f})"

    def fit(self) -> float:
        try:
            self.callbacks.emit("on_fit_start", self)
            for epoch in range(self.state.epoch + 1, self.epochs + 1):
                result = self._train_epoch(epoch)
                if result is not None:
                    self.callbacks.emit("on_epoch_end", self, result)
                if self.stop_request is not None:
                    break
            if self.stop_request is not None and self.stop_request.interrupted:
                self.callbacks.emit("on_interrupt", self, self._position())
            else:
                log.info("Best validation mAP %.4f at epoch %d", self.state.best_metric, self.state.best_epoch)
                self.callbacks.emit("on_fit_end", self)
        finally:
            self.callbacks.emit("close")
        return max(self.state.best_metric, 0.0)

    def _train_epoch(self, epoch: int) -> cb.EpochResult | None:
        """Train one epoch; its result, or None when a stop request ended it early."""
        state = self.state
        state.start_epoch()
        image_size = self._training_size(epoch)
        self.train_sampler.set_epoch(epoch, state.batch_in_epoch)
        started = time.perf_counter()
        plan = EpochPlan(epoch, self.batches_per_epoch, self.cfg.training.accumulate_steps,
                         self.cfg.training.log_every, show_progress(self.cfg.training.progress))
        train_metrics = train_one_epoch(self.step, self.train_loader, state, plan, self._after_step)
        if state.batch_in_epoch < self.batches_per_epoch:
            return None
        state.finish_epoch(epoch)
        # The LR of the epoch's first step: a function of the step, so a resumed epoch logs the same.
        first_step = state.global_step - self.layout.steps_in(self.batches_per_epoch)
        record = {"epoch": epoch, "global_step": state.global_step,
                  "lr": self.schedule.lr_at(first_step),
                  "image_size": image_size, **train_metrics}
        scores, is_best = self._evaluate_epoch(epoch, record) if self._evaluates(epoch) else (None, False)
        record["epoch_time"] = time.perf_counter() - started
        return cb.EpochResult(epoch, record, scores, is_best)

    def _evaluates(self, epoch: int) -> bool:
        return epoch % max(1, self.cfg.training.eval_every) == 0 or epoch == self.epochs

    def _evaluate_epoch(self, epoch: int, record: dict) -> tuple[CocoScores, bool]:
        """Score the epoch into `record`; the scores behind its `map`, and whether it is the best.

        With EMA weights, they are what is scored (the record's `map`, what a search and early
        stopping see); `training.ema.eval_raw` scores the raw weights too, logged as `raw_map`,
        ... The best mAP is the better of the two, and the state remembers which weights reached it.
        """
        primary = "model" if self.ema is None else "ema"
        evaluation = self.evaluate(primary)
        record.update(evaluation.metrics)
        maps = {primary: evaluation.metrics["map"]}
        if primary == "ema" and self.cfg.training.ema.eval_raw:
            raw = self.evaluate("model").metrics
            record.update({f"raw_{key}": value for key, value in raw.items()})
            maps["model"] = raw["map"]
        weights = max(maps, key=maps.get)
        return evaluation.scores, self.state.observe(epoch, maps[weights], weights)

    def _after_step(self) -> bool:
        self.callbacks.emit("on_step_end", self)
        return self.stop_request is not None

    def _position(self) -> str:
        state = self.state
        if state.batch_in_epoch:
            return f"at epoch {state.epoch + 1}, batch {state.batch_in_epoch}/{self.batches_per_epoch}"
        return f"after epoch {state.epoch}"


def trainer_for(plan: Plan, dist: DistContext = SINGLE_PROCESS, callbacks: Sequence[cb.Callback] = ()) -> Trainer:
    """A Trainer for the plan: a new run, or the planned checkpoint restored (its model rebuilt
    from the architecture the checkpoint recorded, so pretrained weights are not fetched again)."""
    if plan.resume_from is None:
        return Trainer(plan.cfg, plan.run_dir, dist, callbacks)
    saved_model = plan.resume_from.payload.get(KEY_MODEL_CONFIG)
    trainer = Trainer(plan.cfg, plan.run_dir, dist, callbacks,
                      architecture=None if saved_model is None else json.loads(saved_model))
    trainer.restore(plan.resume_from)
    return trainer


def run(plan: Plan, dist: DistContext = SINGLE_PROCESS, callbacks: Sequence[cb.Callback] = ()) -> float:
    """Train as planned, writing into the plan's run dir (rank 0 only); returns the best validation mAP."""
    trainer = trainer_for(plan, dist, callbacks)
    # Only a resume that loaded adds anything to the run directory.
    if plan.resume_from is not None and dist.is_main:
        save_resumed_config(plan.run_dir, plan.cfg)
    return trainer.fit()
