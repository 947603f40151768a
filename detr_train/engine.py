"""One training epoch and one evaluation pass, with explicit arguments.

Both return plain dicts of floats. Nothing here knows about Hydra, checkpoints or
searches: the caller passes a `step_hook` that may save a mid-epoch checkpoint or ask
the epoch to stop (pre-emption).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from detr_train.distributed import SINGLE_PROCESS, DistContext, gathered_coco_evaluate
from detr_train.precision import Precision

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf losses and was stopped rather than poison the weights."""


@dataclass
class LossMeter:
    """Running sums of the loss components over an epoch; checkpointed for mid-epoch resume."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    skipped: int = 0
    consecutive_nonfinite: int = 0

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(1, self.count) for key, value in self.sums.items()}

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count, "skipped": self.skipped,
                "consecutive_nonfinite": self.consecutive_nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.count = int(state["count"])
        self.skipped = int(state["skipped"])
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])


@dataclass
class StepSettings:
    grad_clip: float
    nonfinite: str  # "skip" | "stop"
    max_nonfinite_steps: int
    log_every: int
    progress: bool


def _to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    # non_blocking lets the copy overlap compute when the loader pins memory.
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    pixel_mask = batch["pixel_mask"].to(device, non_blocking=True)
    labels = [{k: v.to(device, non_blocking=True) for k, v in label.items()} for label in batch["labels"]]
    return pixel_values, pixel_mask, labels


def _loss_components(outputs) -> dict[str, float]:
    components = {"loss": outputs.loss.detach()}
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        if key in outputs.loss_dict:
            components[key] = outputs.loss_dict[key].detach()
    # One host sync for all components instead of one per .item().
    values = torch.stack([v.float() for v in components.values()]).tolist()
    return dict(zip(components, values))


def _handle_nonfinite(loss_value: float, meter: LossMeter, settings: StepSettings, where: str) -> None:
    meter.skipped += 1
    meter.consecutive_nonfinite += 1
    message = f"non-finite loss ({loss_value}) at {where}"
    if settings.nonfinite == "stop":
        raise NonFiniteLossError(
            f"{message}; training stopped so the weights stay intact. Lower training.lr, enable "
            f"training.grad_clip, try training.amp_dtype=bfloat16, or set training.nonfinite=skip"
        )
    if meter.consecutive_nonfinite > settings.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{message}: {meter.consecutive_nonfinite} non-finite steps in a row "
            f"(training.max_nonfinite_steps={settings.max_nonfinite_steps}); stopping"
        )
    log.warning("%s; step skipped (%d so far this epoch)", message, meter.skipped)


def train_one_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    scheduler,
    precision: Precision,
    device: torch.device,
    settings: StepSettings,
    meter: LossMeter,
    *,
    epoch: int,
    first_batch: int = 0,
    total_batches: int | None = None,
    step_hook: Callable[[int], bool] | None = None,
    any_rank: Callable[[bool], bool] = lambda flag: flag,
    backward_on_skip: bool = False,
) -> dict[str, float]:
    """Train over `batches`; returns mean losses plus timing.

    `step_hook(batch_index)` runs after every optimiser step and returns True to end the
    epoch early (the caller then checkpoints the exact position). Under DDP, `any_rank`
    makes the skip decision for a non-finite loss collective, and `backward_on_skip`
    still runs the backward pass of a skipped step so that every rank joins the
    gradient all-reduce; the gradients are then thrown away.
    """
    model.train()
    data_wait = 0.0
    input_hw: list[int] = []
    start = time.perf_counter()
    tick = start
    bar = tqdm(batches, total=total_batches, initial=first_batch, desc=f"epoch {epoch}",
               disable=not settings.progress, leave=False, dynamic_ncols=True)
    for batch_index, batch in enumerate(bar, start=first_batch):
        data_wait += time.perf_counter() - tick
        pixel_values, pixel_mask, labels = _to_device(batch, device)
        # What the loader actually produced (proves a size change reached the workers).
        input_hw = list(pixel_values.shape[-2:])
        with precision.autocast():
            outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        losses = _loss_components(outputs)
        if any_rank(not math.isfinite(losses["loss"])):
            if backward_on_skip:
                outputs.loss.backward()
            optimizer.zero_grad(set_to_none=True)
            _handle_nonfinite(losses["loss"], meter, settings, f"epoch {epoch}, batch {batch_index}")
        else:
            meter.consecutive_nonfinite = 0
            # Scaler order matters: unscale before clipping so the threshold applies to true grads.
            precision.scaler.scale(outputs.loss).backward()
            if settings.grad_clip > 0:
                precision.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            precision.scaler.step(optimizer)
            precision.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            meter.add(losses)
        scheduler.step()
        if settings.log_every and (batch_index + 1) % settings.log_every == 0:
            log.info("epoch %d batch %d: loss %.4f lr %.2e", epoch, batch_index + 1, losses["loss"],
                     optimizer.param_groups[0]["lr"])
        bar.set_postfix(loss=f"{losses['loss']:.3f}", refresh=False)
        tick = time.perf_counter()
        if step_hook is not None and step_hook(batch_index):
            break
    bar.close()
    elapsed = time.perf_counter() - start
    result = {f"train_{k}": v for k, v in meter.means().items()}
    result["skipped_steps"] = float(meter.skipped)
    result["input_hw"] = input_hw
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
                detections.append(
                    {
                        "image_id": int(image_id),
                        "category_id": label_to_category(label),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": score,
                    }
                )
    return detections


def evaluate(
    model, batches, image_processor, precision, device, coco_gt, image_ids, label_to_category, *, progress=False,
    dist_ctx: DistContext = SINGLE_PROCESS,
) -> dict:
    """Predict on `batches` (this rank's shard) and score with COCOeval restricted to `image_ids`."""
    start = time.perf_counter()
    detections = predict(model, batches, image_processor, precision, device, label_to_category, progress=progress)
    metrics = gathered_coco_evaluate(coco_gt, detections, image_ids, dist_ctx)
    metrics["eval_time"] = time.perf_counter() - start
    return metrics
