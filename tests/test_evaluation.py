"""COCO evaluation: perfect predictions score 1.0; our numbers are pycocotools' numbers."""

from __future__ import annotations

import contextlib
import io
import json
import types

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from detr_train.data.coco import CocoDetectionDataset, SampleRequest
from detr_train.data.collate import DetrCollator
from detr_train.evaluation.coco import STAT_NAMES, load_coco_ground_truth, score_detections
from detr_train.evaluation.evaluator import predict
from detr_train.modeling.build import build_image_processor
from detr_train.modeling.precision import resolve_precision


class _OracleModel(torch.nn.Module):
    """Returns each batch's ground-truth boxes as confident predictions (plus junk queries)."""

    def __init__(self, batches, num_queries=12, num_labels=3):
        super().__init__()
        self.batches, self.calls, self.num_queries, self.num_labels = batches, 0, num_queries, num_labels

    def forward(self, pixel_values, pixel_mask):
        batch = self.batches[self.calls]
        self.calls += 1
        n = len(batch["labels"])
        logits = torch.full((n, self.num_queries, self.num_labels), -12.0)
        boxes = torch.full((n, self.num_queries, 4), 0.05)
        for i, label in enumerate(batch["labels"]):
            k = len(label["class_labels"])
            boxes[i, :k] = label["boxes"]
            logits[i, torch.arange(k), label["class_labels"]] = 12.0
        return types.SimpleNamespace(logits=logits, pred_boxes=boxes)


@pytest.mark.parametrize("size", [96, 72])
def test_perfect_predictions_through_the_model_path_give_map_1(synthetic_root, size):
    # Eval at another size than the images' own exercises the box rescaling.
    ann = synthetic_root / "annotations" / "val.json"
    dataset = CocoDetectionDataset(synthetic_root / "val", ann)
    processor = build_image_processor(size, 1.667)
    collate = DetrCollator(processor, 1.667)
    batches = [collate([dataset[SampleRequest(i, size, 0)] for i in range(s, min(s + 4, len(dataset)))])
               for s in range(0, len(dataset), 4)]
    detections = predict(_OracleModel(batches), batches, processor,
                         resolve_precision(False, "bfloat16", torch.device("cpu")), torch.device("cpu"),
                         dataset.categories.category_id)
    metrics = score_detections(load_coco_ground_truth(ann), detections, dataset.image_ids).metrics
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for ap in metrics["map_per_class"].values())


def _hand_built(tmp_path):
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "2.png"}],
        "categories": [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 4, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [50, 50, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 4, "bbox": [5, 5, 90, 90], "area": 8100, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 9, "bbox": [60, 0, 10, 10], "area": 100, "iscrowd": 1},
        ],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    detections = [
        {"image_id": 1, "category_id": 4, "bbox": [12, 11, 19, 21], "score": 0.9},
        {"image_id": 1, "category_id": 9, "bbox": [48, 55, 40, 25], "score": 0.6},
        {"image_id": 1, "category_id": 4, "bbox": [60, 60, 10, 10], "score": 0.7},
        {"image_id": 2, "category_id": 4, "bbox": [10, 0, 80, 95], "score": 0.8},
        {"image_id": 2, "category_id": 9, "bbox": [61, 1, 9, 9], "score": 0.5},
        {"image_id": 2, "category_id": 9, "bbox": [0, 60, 30, 30], "score": 0.3},
    ]
    return path, detections


def test_reported_numbers_equal_pycocotools(tmp_path):
    path, detections = _hand_built(tmp_path)
    ours = score_detections(load_coco_ground_truth(path), detections, [1, 2]).metrics
    with contextlib.redirect_stdout(io.StringIO()):
        gt = load_coco_ground_truth(path)
        reference = COCOeval(gt, gt.loadRes(detections), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert [ours[name] for name in STAT_NAMES] == pytest.approx(list(reference.stats), abs=0)
    # Per-class AP: the mean of COCOeval's precision over IoUs and recalls, per category.
    precision = reference.eval["precision"]
    for k, name in enumerate(["a", "b"]):
        values = precision[:, :, k, 0, -1]
        assert ours["map_per_class"][name] == pytest.approx(float(np.mean(values[values > -1])))
    assert 0 < ours["map"] < 1


def test_no_detections_score_zero(tmp_path):
    path, _ = _hand_built(tmp_path)
    metrics = score_detections(load_coco_ground_truth(path), [], [1, 2]).metrics
    assert metrics["map"] == 0.0 and metrics["map_per_class"] == {"a": 0.0, "b": 0.0}
