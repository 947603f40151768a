"""One training epoch and one evaluation pass.

`TrainStep` is one optimiser step (forward, loss, non-finite guard, backward, clip,
update) and `train_one_epoch` walks the batches of an epoch through it, advancing the
run's `TrainState`. `Evaluator` predicts and scores with COCOeval. Both return plain
dicts of floats. Nothing here knows about Hydra, checkpoints or searches: the caller's
`on_step_end` may save a mid-epoch checkpoint or end the epoch early (pre-emption).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from detr_train import distributed
from detr_train.errors import DetrTrainError
from detr_train.evaluation import gathered_coco_evaluate
from detr_train.launch_env import SINGLE_PROCESS, DistContext
from detr_train.optim import LRSchedule
from detr_train.precision import Precision
from detr_train.state import TrainState

log = logging.getLogger(__name__)

LOGGED_LOSSES = ("loss_ce", "loss_bbox", "loss_giou")


class NonFiniteLossError(DetrTrainError, RuntimeError):
    """Training produced NaN/inf losses and was stopped rather than poison the weights."""


@dataclass(frozen=True)
class NonFinitePolicy:
    """What a NaN/inf loss does: `skip` the step (at most `max_in_a_row` in a row) or `stop` the run."""

    action: str = "skip"
    max_in_a_row: int = 20


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    total_batches: int
    log_every: int = 0
    show_progress: bool = False


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    # non_blocking lets the copy overlap compute when the loader pins memory.
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
    labels = [{k: v.to(device, non_blocking=True) for k, v in label.items()} for label in batch["labels"]]
    return pixel_values, pixel_mask, labels


def _loss_components(outputs) -> dict[str, float]:
    components = {"loss": outputs.loss.detach()}
    for key in LOGGED_LOSSES:
        if key in outputs.loss_dict:
            components[key] = outputs.loss_dict[key].detach()
    # The step's one host sync: all components at once instead of one .item() each.
    values = torch.stack([v.float() for v in components.values()]).tolist()
    return dict(zip(components, values))


class TrainStep:
    """One optimiser step on one batch, the same code for fp32, bf16 and fp16."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: LRSchedule, precision: Precision,
        *, grad_clip: float, nonfinite: NonFinitePolicy, device: torch.device, dist: DistContext = SINGLE_PROCESS,
    ):
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.precision = precision
        self.grad_clip = grad_clip
        self.nonfinite = nonfinite
        self.device = device
        self.dist = dist
        self.input_hw: list[int] = []

    def __call__(self, batch: dict, state: TrainState) -> dict[str, float]:
        """Train on `batch` at `state.global_step`; returns the loss components (host floats)."""
        pixel_values, pixel_mask, labels = to_device(batch, self.device)
        self.schedule.apply(state.global_step)
        with self.precision.autocast():
            outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        losses = _loss_components(outputs)
        self.input_hw = list(pixel_values.shape[-2:])  # proves a size change reached the workers
        # Every rank must skip together, or the others would wait in the gradient all-reduce.
        if distributed.any_rank(not math.isfinite(losses["loss"]), self.dist):
            self._skip(outputs.loss, losses["loss"], state)
        else:
            self._update(outputs.loss)
            state.meter.consecutive_nonfinite = 0
            state.meter.add(losses)
        return losses

    def _update(self, loss: torch.Tensor) -> None:
        scaler = self.precision.scaler
        scaler.scale(loss).backward()
        if self.grad_clip > 0:
            # Unscale first so that the threshold applies to the true gradients.
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _skip(self, loss: torch.Tensor, value: float, state: TrainState) -> None:
        if self.dist.enabled:
            # DDP's backward is a collective: join it, then throw the gradients away.
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        meter = state.meter
        meter.skipped += 1
        meter.consecutive_nonfinite += 1
        message = f"non-finite loss ({value}) at epoch {state.epoch + 1}, batch {state.batch_in_epoch}"
        if self.nonfinite.action == "stop":
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


def train_one_epoch(
    step: TrainStep, batches: Iterable[dict], state: TrainState, plan: EpochPlan, on_step_end: Callable[[], bool],
) -> dict[str, float]:
    """Train over `batches` from `state.batch_in_epoch` on; returns mean losses plus timing.

    After every step `state` has advanced and `on_step_end()` runs; True ends the epoch
    early (the caller then checkpoints that exact position).
    """
    step.model.train()
    data_wait = 0.0
    start = tick = time.perf_counter()
    bar = tqdm(batches, total=plan.total_batches, initial=state.batch_in_epoch, desc=f"epoch {plan.epoch}",
               disable=not plan.show_progress, leave=False, dynamic_ncols=True)
    for batch in bar:
        data_wait += time.perf_counter() - tick
        losses = step(batch, state)
        state.global_step += 1
        state.batch_in_epoch += 1
        if plan.log_every and state.batch_in_epoch % plan.log_every == 0:
            log.info("epoch %d batch %d: loss %.4f lr %.2e", plan.epoch, state.batch_in_epoch, losses["loss"],
                     step.optimizer.param_groups[0]["lr"])
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


def _canvas_target_sizes(pixel_mask: torch.Tensor, orig_sizes: torch.Tensor) -> torch.Tensor:
    """Sizes that map predicted boxes back to original-image pixels.

    The processor normalises boxes to the padded canvas, so predictions are fractions
    of the canvas: scale by canvas/resized (undo the padding) times original size.
    """
    canvas_h, canvas_w = pixel_mask.shape[-2:]
    resized_h = pixel_mask[:, :, 0].sum(dim=1).float()
    resized_w = pixel_mask[:, 0, :].sum(dim=1).float()
    scale_h = canvas_h / resized_h * orig_sizes[:, 0].float()
    scale_w = canvas_w / resized_w * orig_sizes[:, 1].float()
    return torch.stack([scale_h, scale_w], dim=1)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    batches: Iterable[dict],
    image_processor,
    precision: Precision,
    device: torch.device,
    label_to_category: Callable[[int], int],
    *,
    progress: bool = False,
    top_k: int = 100,
) -> list[dict]:
    """COCO-format detections (image_id, category_id, bbox xywh, score) for every image."""
    model.eval()
    detections: list[dict] = []
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
        with precision.autocast():
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        target_sizes = _canvas_target_sizes(batch["pixel_mask"], batch["orig_sizes"])
        results = image_processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=target_sizes.to(device), top_k=top_k
        )
        for image_id, result in zip(batch["image_ids"], results):
            for score, label, (x0, y0, x1, y1) in zip(
                result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
            ):
                detections.append({"image_id": int(image_id), "category_id": label_to_category(label),
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return detections


class Evaluator:
    """Predict on this rank's shard of the validation batches and score with one COCOeval."""

    def __init__(self, image_processor, precision: Precision, device: torch.device, coco_gt, image_ids: list[int],
                 label_to_category: Callable[[int], int], *, dist: DistContext = SINGLE_PROCESS, progress: bool = False):
        self.image_processor = image_processor
        self.precision = precision
        self.device = device
        self.coco_gt = coco_gt
        self.image_ids = image_ids
        self.label_to_category = label_to_category
        self.dist = dist
        self.progress = progress

    def __call__(self, model: torch.nn.Module, batches: Iterable[dict]) -> dict:
        start = time.perf_counter()
        detections = predict(model, batches, self.image_processor, self.precision, self.device,
                             self.label_to_category, progress=self.progress)
        metrics = gathered_coco_evaluate(self.coco_gt, detections, self.image_ids, self.dist)
        metrics["eval_time"] = time.perf_counter() - start
        return metrics
