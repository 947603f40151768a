"""The detection confusion matrix: what each ground-truth object was detected as, and what was
detected where there was nothing.

Layout (MMDetection's `tools/analysis_tools/confusion_matrix.py`; Ultralytics' `ConfusionMatrix`
is its transpose): rows are ground-truth classes, columns predicted classes, both in the
dataset's class order (sorted category ids, which are the model's labels) and then "background":

    counts[g, p]   an object of class g detected as class p (the diagonal: correct)
    counts[g, -1]  an object of class g no detection matched: missed
    counts[-1, p]  a detection of class p that matched no object: a false detection
    counts[-1, -1] always 0

Rows as ground truth read like a classifier's matrix: a row sums to the class's object count,
so each row's share shows where that class's objects went.

Matching, per image: the detections scoring at least the score threshold, and every
(detection, object) pair with IoU >= the IoU threshold (0.5, AP50's). Pairs are taken greedily
by IoU, highest first, one to one, regardless of class (class-agnostic, as both references
do): a car detected as a truck is then a confusion, not a miss plus a false detection. Crowd
regions (iscrowd=1) are treated as COCOeval treats them: never an object to find, and a
detection left over inside one (its intersection covering >= the IoU threshold of the
detection, COCOeval's crowd IoU) is no false detection.

A pure function of detections and ground truth, per image then summed: under DDP it runs on
the main process over every rank's gathered detections (`coco.gathered_scores`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools.coco import COCO
from torchvision.ops import box_convert, box_iou

BACKGROUND = "background"
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts over the classes plus background; rows ground truth, columns predicted."""

    class_names: tuple[str, ...]  # without background
    counts: np.ndarray  # int64 [K + 1, K + 1]
    iou_threshold: float
    score_threshold: float

    @property
    def labels(self) -> list[str]:
        return [*self.class_names, BACKGROUND]

    def describe(self) -> str:
        return f"IoU >= {self.iou_threshold:g}, score >= {self.score_threshold:g}"

    def summary(self) -> str:
        """One line of totals for the log."""
        objects = self.counts[:-1]
        correct = int(np.trace(objects[:, :-1]))
        confused = int(objects[:, :-1].sum()) - correct
        return (f"{correct} objects found as their class, {confused} as another, {int(objects[:, -1].sum())} missed, "
                f"{int(self.counts[-1, :-1].sum())} false detections ({self.describe()})")

    def as_dict(self) -> dict:
        """The plain-JSON form metrics.json holds."""
        return {"classes": self.labels, "counts": self.counts.tolist(), "rows": "ground truth",
                "columns": "predicted", "iou": self.iou_threshold, "score_threshold": self.score_threshold}


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    return box_convert(torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4), "xywh", "xyxy")


def _coverage_of_detections(detections: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """[D, R] intersection area / detection area: COCOeval's IoU against a crowd region."""
    top_left = torch.maximum(detections[:, None, :2], regions[None, :, :2])
    bottom_right = torch.minimum(detections[:, None, 2:], regions[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    areas = (detections[:, 2:] - detections[:, :2]).prod(dim=1)
    return intersection / areas.clamp(min=torch.finfo(areas.dtype).tiny)[:, None]


def image_confusion(gt_boxes: torch.Tensor, gt_labels: Sequence[int], det_boxes: torch.Tensor,
                    det_labels: Sequence[int], det_scores: Sequence[float], num_classes: int, *,
                    crowd_boxes: torch.Tensor | None = None, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """The [K + 1, K + 1] counts of one image (boxes xyxy; detections already at or above the
    score threshold; labels 0..K-1, K is background)."""
    counts = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    det_matched = np.zeros(len(det_labels), dtype=bool)
    gt_matched = np.zeros(len(gt_labels), dtype=bool)
    if len(gt_labels) and len(det_labels):
        iou = box_iou(det_boxes, gt_boxes).numpy()
        det_index, gt_index = np.nonzero(iou >= iou_threshold)
        scores = np.asarray(det_scores, dtype=np.float64)
        # Highest IoU first; equal IoUs: the higher-scoring detection, then the input order.
        for pair in np.lexsort((gt_index, det_index, -scores[det_index], -iou[det_index, gt_index])):
            d, g = det_index[pair], gt_index[pair]
            if det_matched[d] or gt_matched[g]:
                continue
            det_matched[d] = gt_matched[g] = True
            counts[gt_labels[g], det_labels[d]] += 1
    np.add.at(counts[:, num_classes], np.asarray(gt_labels, dtype=np.int64)[~gt_matched], 1)
    leftover = np.flatnonzero(~det_matched)
    if len(leftover) and crowd_boxes is not None and len(crowd_boxes):
        in_crowd = (_coverage_of_detections(det_boxes[leftover], crowd_boxes) >= iou_threshold).any(dim=1).numpy()
        leftover = leftover[~in_crowd]
    np.add.at(counts[num_classes], np.asarray(det_labels, dtype=np.int64)[leftover], 1)
    return counts


def confusion_matrix(ground_truth: COCO, detections: Sequence[dict], image_ids: Sequence[int], *,
                     score_threshold: float, iou_threshold: float = IOU_THRESHOLD) -> ConfusionMatrix:
    """The confusion matrix of COCO-format detections (image_id, category_id, bbox xywh, score)
    against `ground_truth` on `image_ids` (the evaluated images: objects elsewhere are not
    counted as missed)."""
    category_ids = sorted(ground_truth.getCatIds())
    label_of = {category_id: label for label, category_id in enumerate(category_ids)}
    names = tuple(str(c.get("name", c["id"])) for c in ground_truth.loadCats(category_ids))
    kept: dict[int, list[dict]] = defaultdict(list)
    for detection in detections:
        if detection["score"] >= score_threshold:  # as detr-train-predict keeps them
            kept[int(detection["image_id"])].append(detection)
    counts = np.zeros((len(category_ids) + 1, len(category_ids) + 1), dtype=np.int64)
    for image_id in sorted({int(i) for i in image_ids}):
        annotations = ground_truth.imgToAnns.get(image_id, [])
        objects = [a for a in annotations if not a.get("iscrowd", 0)]
        crowds = [a for a in annotations if a.get("iscrowd", 0)]
        found = kept.get(image_id, [])
        counts += image_confusion(
            _xyxy([a["bbox"] for a in objects]), [label_of[a["category_id"]] for a in objects],
            _xyxy([d["bbox"] for d in found]), [label_of[d["category_id"]] for d in found],
            [d["score"] for d in found], len(category_ids),
            crowd_boxes=_xyxy([a["bbox"] for a in crowds]), iou_threshold=iou_threshold,
        )
    return ConfusionMatrix(names, counts, float(iou_threshold), float(score_threshold))
