"""Detections of a model, and one evaluation pass scored by COCOeval.

`predict` turns a model's outputs on a loader's batches into COCO-format detections in
original-image pixels; `Evaluator` runs it on this rank's shard of the validation set
and scores every rank's detections together with one COCOeval.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from detr_train.distributed.launch import SINGLE_PROCESS, DistContext
from detr_train.evaluation.coco import CocoScores, gathered_scores
from detr_train.evaluation.slicing import SliceSettings, with_tiles
from detr_train.modeling.precision import Precision


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
def _detect(model: torch.nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, sizes: torch.Tensor,
            image_processor, precision: Precision, device: torch.device, top_k: int) -> list[dict]:
    """One model call: each input's top-k detections, boxes in pixels of its `sizes` (h, w)."""
    pixel_values = pixel_values.to(device, non_blocking=True)
    pixel_mask_on_device = pixel_mask.to(device, non_blocking=True)
    with precision.autocast():
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask_on_device)
    outputs.logits = outputs.logits.float()
    outputs.pred_boxes = outputs.pred_boxes.float()
    target_sizes = _canvas_target_sizes(pixel_mask, sizes)
    return image_processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=target_sizes.to(device), top_k=top_k
    )


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
    slicing: SliceSettings | None = None,
) -> list[dict]:
    """COCO-format detections (image_id, category_id, bbox xywh, score) for every image.

    With `slicing`, the batches carry tiles (`evaluation.slicing.SlicedCollator`) whose
    detections merge with the whole images'.
    """
    model.eval()
    detect = functools.partial(_detect, model, image_processor=image_processor, precision=precision, device=device,
                               top_k=top_k)
    detections: list[dict] = []
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False, dynamic_ncols=True):
        results = detect(batch["pixel_values"], batch["pixel_mask"], batch["orig_sizes"])
        if slicing is not None:
            results = with_tiles(results, batch, detect, slicing, top_k)
        for image_id, result in zip(batch["image_ids"], results):
            for score, label, (x0, y0, x1, y1) in zip(
                result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
            ):
                detections.append({"image_id": int(image_id), "category_id": label_to_category(label),
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return detections


@dataclass(frozen=True)
class Evaluation:
    """The metrics of one evaluation (plain floats, `eval_time` included) and the COCOeval
    arrays and detections behind them (on the main process)."""

    metrics: dict
    scores: CocoScores


class Evaluator:
    """Predict on this rank's shard of the validation batches and score with one COCOeval."""

    def __init__(self, image_processor, precision: Precision, device: torch.device, coco_gt, image_ids: list[int],
                 label_to_category: Callable[[int], int], *, dist: DistContext = SINGLE_PROCESS, progress: bool = False,
                 slicing: SliceSettings | None = None):
        self.image_processor = image_processor
        self.precision = precision
        self.device = device
        self.coco_gt = coco_gt
        self.image_ids = image_ids
        self.label_to_category = label_to_category
        self.dist = dist
        self.progress = progress
        self.slicing = slicing  # the batches then carry tiles (evaluation.slicing.sliced_collator)

    def __call__(self, model: torch.nn.Module, batches: Iterable[dict]) -> Evaluation:
        start = time.perf_counter()
        detections = predict(model, batches, self.image_processor, self.precision, self.device,
                             self.label_to_category, progress=self.progress, slicing=self.slicing)
        scores = gathered_scores(self.coco_gt, detections, self.image_ids, self.dist)
        return Evaluation({**scores.metrics, "eval_time": time.perf_counter() - start}, scores)
