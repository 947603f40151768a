"""One training epoch.

`TrainStep` is one optimiser step (forward, loss, non-finite guard, backward, clip,
update) and `train_one_epoch` walks the batches of an epoch through it, advancing the
run's `TrainState`, and returns a plain dict of floats. Nothing here knows about Hydra,
checkpoints or searches: the caller's `on_step_end` may save a mid-epoch checkpoint or
end the epoch early (pre-emption).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from detr_train.checkpointing.state import TrainState
from detr_train.config.schema import NonFinitePolicy
from detr_train.distributed import collectives as distributed
from detr_train.distributed.launch import SINGLE_PROCESS, DistContext
from detr_train.errors import DetrTrainError
from detr_train.modeling.criterion import DeformableDetrCriterion, count_target_boxes
from detr_train.modeling.precision import Precision
from detr_train.training.ema import ModelEMA
from detr_train.training.optim import LRSchedule

log = logging.getLogger(__name__)

LOGGED_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


class NonFiniteLossError(DetrTrainError, RuntimeError):
    """Training produced NaN/inf losses and was stopped rather than poison the weights."""


@dataclass(frozen=True)
class NonFiniteGuard:
    """What a NaN/inf loss does (`training.nonfinite`): `skip` the step, at most `max_in_a_row`
    in a row (`training.max_nonfinite_steps`), or `stop` the run."""

    policy: NonFinitePolicy = NonFinitePolicy.skip
    max_in_a_row: int = 20


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    total_batches: int  # loader batches (micro-batches) in the epoch
    accumulate: int = 1  # micro-batches per optimiser step
    log_every: int = 0  # optimiser steps between loss lines; 0: none
    show_progress: bool = False


def to_device(batch: dict, device: torch.device, *, channels_last: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    # non_blocking lets the copy overlap compute when the loader pins memory.
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
    labels = [{k: v.to(device, non_blocking=True) for k, v in label.items()} for label in batch["labels"]]
    return pixel_values, pixel_mask, labels


class TrainStep:
    """One optimiser step over one or more micro-batches, the same code for fp32, bf16 and fp16.

    With K micro-batches (gradient accumulation) the DETR loss of each is normalised by the
    box count of all K (and, under DDP, of every rank), so the summed gradients are those of
    one batch K times larger. DDP all-reduces the gradients only after the last micro-batch.
    The step reads the device once: the loss components, which also decide whether the
    step is applied (a NaN/inf loss throws the gradients away on every rank).
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule, precision: Precision,
        *, grad_clip: float, nonfinite: NonFiniteGuard, device: torch.device, dist: DistContext = SINGLE_PROCESS,
        criterion: DeformableDetrCriterion | None = None, channels_last: bool = False, ema: ModelEMA | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.precision = precision
        self.grad_clip = grad_clip
        self.nonfinite = nonfinite
        self.device = device
        self.dist = dist
        self.criterion = criterion
        self.channels_last = channels_last
        self.ema = ema
        self.input_hw: list[int] = []

    def __call__(self, micro_batches: Sequence[dict], state: TrainState) -> dict[str, float]:
        """Train on `micro_batches` at `state.global_step`; returns the loss components (host floats)."""
        self.schedule.apply(state.global_step)
        with self._normalised_over(micro_batches):
            totals: dict[str, torch.Tensor] = {}
            for index, batch in enumerate(micro_batches):
                # DDP averages gradients once per step, after the last micro-batch.
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                    parts = self._forward_backward(batch)
                for key, value in parts.items():
                    totals[key] = totals[key] + value if key in totals else value
        # The step's one host sync: all components at once instead of one .item() each.
        losses = dict(zip(totals, torch.stack([v.float() for v in totals.values()]).tolist()))
        # Every rank must decide alike: the gradients were averaged across all of them.
        if distributed.any_rank(not math.isfinite(losses["loss"]), self.dist):
            self.optimizer.zero_grad(set_to_none=True)
            self._skipped(losses["loss"], state)
        else:
            self._update()
            state.meter.consecutive_nonfinite = 0
            state.meter.add(losses)
        return losses

    def _normalised_over(self, micro_batches: Sequence[dict]):
        if self.criterion is None:
            return contextlib.nullcontext()
        count = float(sum(count_target_boxes(batch["labels"]) for batch in micro_batches))
        if not self.dist.enabled:
            return self.criterion.normalized_by(count)
        # The global batch's mean boxes per rank; torch.full fills on the device, and the
        # all-reduce queues on the GPU stream: no host sync.
        total = torch.full((), count, dtype=torch.float32, device=distributed.collective_device())
        torch.distributed.all_reduce(total)
        return self.criterion.normalized_by(total.to(self.device) / self.dist.world_size)

    def _forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        pixel_values, pixel_mask, labels = to_device(batch, self.device, channels_last=self.channels_last)
        self.input_hw = list(pixel_values.shape[-2:])  # proves a size change reached the workers
        with self.precision.autocast():
            outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
            loss = outputs.loss
            parts = {key: outputs.loss_dict[key] for key in LOGGED_LOSSES if key in outputs.loss_dict}
            if self.criterion is not None and self.criterion.two_stage:
                encoder_loss, encoder_parts = self.criterion.total_encoder_loss(
                    outputs.enc_outputs_class, outputs.enc_outputs_coord_logits, labels)
                loss = loss + encoder_loss
                parts.update({f"{key}_enc": encoder_parts[f"{key}_enc"] for key in LOGGED_LOSSES})
        self.precision.scaler.scale(loss).backward()
        return {"loss": loss.detach(), **{key: value.detach() for key, value in parts.items()}}

    def _update(self) -> None:
        scaler = self.precision.scaler
        if self.grad_clip > 0:
            # Unscale first so that the threshold applies to the true gradients.
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()

    def _skipped(self, value: float, state: TrainState) -> None:
        meter = state.meter
        meter.skipped += 1
        meter.consecutive_nonfinite += 1
        message = f"non-finite loss ({value}) at epoch {state.epoch + 1}, step {state.global_step}"
        if self.nonfinite.policy == NonFinitePolicy.stop:
            raise NonFiniteLossError(
                f"{message}; training stopped so the weights stay intact",
                hint="lower training.lr, enable training.grad_clip, try training.amp_dtype=bfloat16, "
                     "or set training.nonfinite=skip",
            )
        if meter.consecutive_nonfinite > self.nonfinite.max_in_a_row:
            raise NonFiniteLossError(
                f"{message}: {meter.consecutive_nonfinite} non-finite steps in a row "
                f"(training.max_nonfinite_steps={self.nonfinite.max_in_a_row}); stopping"
            )
        log.warning("%s; step skipped (%d so far this epoch)", message, meter.skipped)


def _windows(batches: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive groups of `size` batches (the last may be shorter)."""
    window: list[dict] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train_one_epoch(
    step: TrainStep, batches: Iterable[dict], state: TrainState, plan: EpochPlan, on_step_end: Callable[[], bool],
) -> dict[str, float]:
    """Train over `batches` from `state.batch_in_epoch` on, `plan.accumulate` batches per
    optimiser step; returns mean losses plus timing.

    After every optimiser step `state` has advanced and `on_step_end()` runs; True ends the
    epoch early (the caller then checkpoints that exact position, a step boundary).
    """
    step.model.train()
    data_wait = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(total=plan.total_batches, initial=state.batch_in_epoch, desc=f"epoch {plan.epoch}",
               disable=not plan.show_progress, leave=False, dynamic_ncols=True)
    for window in _windows(batches, plan.accumulate):
        data_wait += time.perf_counter() - tick
        losses = step(window, state)
        state.global_step += 1
        state.batch_in_epoch += len(window)
        if plan.log_every and state.global_step % plan.log_every == 0:
            log.info("epoch %d step %d: loss %.4f lr %.2e", plan.epoch, state.global_step, losses["loss"],
                     step.optimizer.param_groups[0]["lr"])
        bar.update(len(window))
        bar.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)
        tick = time.perf_counter()
        if on_step_end():
            break
    bar.close()
    elapsed = time.perf_counter() - start
    result: dict = {f"train_{k}": v for k, v in state.meter.means().items()}
    result["skipped_steps"] = float(state.meter.skipped)
    result["input_hw"] = step.input_hw
    result["data_wait_fraction"] = data_wait / elapsed if elapsed > 0 else 0.0
    return result
