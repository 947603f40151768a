"""COCO mAP with pycocotools, against the original annotation json.

The numbers are COCOeval's own (`stats`), under stable names; per-class AP is read
from COCOeval's precision array the way COCOeval's summarize() averages it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_train.distributed.collectives import broadcast_from_main, gather_to_main
from detr_train.distributed.launch import DistContext

log = logging.getLogger(__name__)

# Names of COCOeval.stats entries, in order.
STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def load_coco_ground_truth(ann_file: Path) -> COCO:
    # pycocotools prints progress to stdout; keep the CLI's output to our log.
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def _per_class_ap(evaluator: COCOeval) -> list[float]:
    """AP@[.5:.95] per category, area=all, maxDets=100; -1 where the class has no ground truth."""
    precision = evaluator.eval["precision"]  # [iou, recall, category, area, maxdets]
    result = []
    for k in range(precision.shape[2]):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        result.append(float(np.mean(values)) if values.size else -1.0)
    return result


@dataclass
class CocoScores:
    """COCOeval's results: the metrics, and its own precision array for curves."""

    metrics: dict
    # eval["precision"]: [iou thresholds, recall points, classes, areas, max dets], -1 = no data;
    # None when there were no detections to evaluate.
    precision: np.ndarray | None = None
    recall_thresholds: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)  # in the precision array's class order
    detections: list[dict] = field(default_factory=list)  # what was scored: every rank's (main process)
    # What they were scored against: the ground truth and the images COCOeval looked at (main process).
    ground_truth: COCO | None = None
    image_ids: list[int] = field(default_factory=list)


def score_detections(
    coco_gt: COCO, detections: Sequence[dict], image_ids: Sequence[int], *, class_names: dict[int, str] | None = None,
) -> CocoScores:
    """Score COCO-format detections (image_id, category_id, bbox xywh, score) on `image_ids`.

    The metrics are floats named as in STAT_NAMES, plus `map_per_class` (name -> AP); COCOeval's
    precision array is kept for precision-recall curves. With no detections at all every score
    is 0 (COCOeval cannot load an empty result).
    """
    image_ids = sorted(int(i) for i in image_ids)
    category_ids = sorted(coco_gt.getCatIds())
    names = class_names or {c["id"]: c["name"] for c in coco_gt.loadCats(category_ids)}
    if not detections:
        metrics = {name: 0.0 for name in STAT_NAMES}
        metrics["map_per_class"] = {names[c]: 0.0 for c in category_ids}
        return CocoScores(metrics, class_names=[names[c] for c in category_ids], ground_truth=coco_gt,
                          image_ids=image_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}
    per_class = _per_class_ap(evaluator)
    metrics["map_per_class"] = {names[c]: ap for c, ap in zip(evaluator.params.catIds, per_class)}
    return CocoScores(metrics, evaluator.eval["precision"], np.asarray(evaluator.params.recThrs),
                      [names[c] for c in evaluator.params.catIds], ground_truth=coco_gt, image_ids=image_ids)


def format_per_class_table(map_per_class: dict[str, float]) -> str:
    """A small fixed-width table for the log: class, AP."""
    width = max([len(name) for name in map_per_class] + [5])
    lines = [f"{'class':<{width}}  AP@[.5:.95]"]
    for name, ap in map_per_class.items():
        lines.append(f"{name:<{width}}  {'n/a' if ap < 0 else f'{ap:.4f}'}")
    return "\n".join(lines)


def gathered_scores(coco_gt: COCO, local_detections: list[dict], image_ids: list[int], ctx: DistContext) -> CocoScores:
    """COCOeval once, on rank 0, over the detections of every rank's shard: the metrics on all
    ranks, COCOeval's arrays and the gathered detections on rank 0 only."""
    if not ctx.enabled:
        scores = score_detections(coco_gt, local_detections, image_ids)
        scores.detections = list(local_detections)
        return scores
    shards = gather_to_main(local_detections, ctx)
    scores = None
    if ctx.is_main:
        detections = [d for shard in shards for d in shard]
        scores = score_detections(coco_gt, detections, image_ids)
        scores.detections = detections
    metrics = broadcast_from_main(None if scores is None else scores.metrics, ctx)
    return scores if ctx.is_main else CocoScores(metrics)
