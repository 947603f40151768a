"""Plots and box drawings: files are valid and replaced atomically, PR curves are COCOeval's own."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_train.reporting.colors import class_color
from detr_train.reporting.drawing import draw_detections, save_image, side_by_side
from detr_train.reporting.plots import (
    IOU_50_INDEX,
    IOU_75_INDEX,
    MEAN_OVER_IOUS,
    plot_per_class_ap,
    plot_precision_recall,
    plot_training_curves,
    precision_recall_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _epoch_record(epoch: int, *, evaluated: bool) -> dict:
    record = {
        "epoch": epoch, "global_step": 12 * epoch, "lr": 1e-4 * 0.5 ** epoch, "image_size": 96,
        "train_loss": 3.0 / epoch, "train_loss_ce": 1.0 / epoch, "train_loss_bbox": 0.2 / epoch,
        "train_loss_giou": 0.6 / epoch, "skipped_steps": 0, "input_hw": [96, 96], "data_wait_fraction": 0.05,
        "epoch_time": 1.5,
    }
    if evaluated:
        record.update({"map": 0.1 * epoch, "map_50": 0.2 * epoch, "map_75": 0.05 * epoch, "map_small": -1.0 + epoch,
                       "map_per_class": {"cat": 0.1 * epoch, "dog": -1.0}, "eval_time": 0.5})
    return record


def _png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def _temp_files(folder) -> list:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_training_curves_png_is_written_then_replaced_without_leftovers(tmp_path):
    path = tmp_path / "plots" / "curves.png"
    # Epoch 2 was not evaluated; epoch 3 has a diverged loss and a null written for NaN,
    # and no small objects in its ground truth (COCOeval's -1).
    records = [_epoch_record(1, evaluated=False), _epoch_record(2, evaluated=True), _epoch_record(3, evaluated=True)]
    records[2].update(train_loss=float("nan"), train_loss_ce=None, map_small=-1.0)

    assert plot_training_curves(records[:1], path) == path  # one epoch, not evaluated yet
    width, height = _png_size(path)
    assert 900 <= width <= 2000 and 500 <= height <= 1200
    first_bytes, first_inode = path.read_bytes(), path.stat().st_ino

    plot_training_curves(records, path)
    assert _png_size(path) == (width, height)
    assert path.read_bytes() != first_bytes
    assert path.stat().st_ino != first_inode  # replaced by rename, not rewritten in place
    assert _temp_files(path.parent) == []


def test_training_curves_of_no_records(tmp_path):
    assert _png_size(plot_training_curves([], tmp_path / "none.png"))[0] > 0


# matplotlib's "tab:blue", the colour of every AP bar.
BAR_RGB = (31, 119, 180)


def _bar_lengths(path) -> list[int]:
    """The AP bars of a per-class AP plot, top to bottom: each bar's length in pixels, from its
    first to its last pixel of the exact bar colour along its middle row (grid lines may cross
    it; anti-aliased edges are not the exact colour)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    is_bar = (pixels == BAR_RGB).all(axis=2)
    rows = np.flatnonzero(is_bar.any(axis=1))
    bands = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1) if len(rows) else []
    middles = [np.flatnonzero(is_bar[band[len(band) // 2]]) for band in bands]
    return [int(columns[-1] - columns[0] + 1) for columns in middles]


@pytest.mark.parametrize("num_classes", [10, 80])
def test_per_class_ap_bars_match_the_aps_best_first(tmp_path, num_classes):
    rng = np.random.default_rng(0)
    aps = {f"class_{k}": float(rng.uniform(0.05, 0.9)) for k in range(num_classes)}
    aps["class_3"] = -1.0
    aps["class_5"] = None  # a NaN AP after the metrics.jsonl round trip
    path = plot_per_class_ap(aps, tmp_path / "per_class_ap.png")
    width, height = _png_size(path)
    # Taller with more classes, so 80 names do not overlap.
    assert 600 <= width <= 1000
    assert height >= 1.4 * 100 + 0.2 * 100 * num_classes
    assert _temp_files(tmp_path) == []

    # One bar per class with ground truth (n/a classes have none), best first, each as long as
    # its AP: the lengths lie on a line through the origin (an edge pixel of anti-aliasing
    # aside), within 3 pixels of ~600, where a grid line crosses a bar's end.
    scored = sorted((ap for ap in aps.values() if ap is not None and ap >= 0), reverse=True)
    lengths = np.array(_bar_lengths(path), dtype=float)
    assert len(lengths) == len(scored)
    slope, intercept = np.polyfit(scored, lengths, 1)
    assert slope > 500 and abs(intercept) <= 3
    assert np.abs(lengths - (slope * np.array(scored) + intercept)).max() <= 3, (lengths, scored)


# ---------------------------------------------------------------------------------------
# Precision-recall from a real COCOeval
# ---------------------------------------------------------------------------------------
def _tiny_coco(tmp_path):
    """3 images, categories 1 (cat), 3 (dog), 7 (bird; no ground truth): sparse ids on purpose."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2, 3)]
    boxes = {1: [[10, 10, 50, 50], [100, 100, 60, 40]], 2: [[20, 30, 80, 80]], 3: [[5, 5, 30, 30], [120, 20, 40, 70]]}
    categories = {1: [1, 3], 2: [1], 3: [3, 3]}
    annotations, next_id = [], 1
    for image_id, image_boxes in boxes.items():
        for box, category in zip(image_boxes, categories[image_id]):
            annotations.append({"id": next_id, "image_id": image_id, "category_id": category, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
            next_id += 1
    cats = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]
    ann_file = tmp_path / "gt.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.95},  # exact
        {"image_id": 1, "category_id": 3, "bbox": [100, 100, 60, 52], "score": 0.9},  # IoU ~0.77
        {"image_id": 2, "category_id": 1, "bbox": [20, 30, 80, 120], "score": 0.6},  # IoU ~0.67: TP at .5 only
        {"image_id": 3, "category_id": 3, "bbox": [5, 5, 30, 30], "score": 0.3},  # exact, low score
        {"image_id": 3, "category_id": 3, "bbox": [150, 150, 30, 30], "score": 0.8},  # false positive
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.5},  # class without ground truth
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(ann_file))
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    names = {c["id"]: c["name"] for c in cats}
    return evaluator, [names[c] for c in evaluator.params.catIds]


@pytest.fixture(scope="module")
def coco_eval_result(tmp_path_factory):
    return _tiny_coco(tmp_path_factory.mktemp("coco"))


def test_pr_curve_indices_reproduce_cocoeval_summary(coco_eval_result):
    evaluator, _ = coco_eval_result
    precision = evaluator.eval["precision"]
    assert list(evaluator.params.catIds) == [1, 3, 7]
    for iou_index, stat_index in ((MEAN_OVER_IOUS, 0), (IOU_50_INDEX, 1), (IOU_75_INDEX, 2)):
        curves = precision_recall_curves(precision, iou_index)
        assert curves.shape == (len(evaluator.params.recThrs), 3)
        assert np.isnan(curves[:, 2]).all()  # bird: no ground truth
        classes_with_data = curves[:, :2]
        # The area under the mean curve is the AP that summarize() reports.
        assert np.mean(classes_with_data) == pytest.approx(evaluator.stats[stat_index])
    assert 0 < evaluator.stats[2] < evaluator.stats[1] < 1  # the data distinguishes the IoUs


def test_pr_plot_from_cocoeval_arrays(tmp_path, coco_eval_result):
    evaluator, class_names = coco_eval_result
    path = plot_precision_recall(evaluator.eval["precision"], evaluator.params.recThrs, class_names,
                                 tmp_path / "pr_curves.png")
    width, height = _png_size(path)
    assert width > 1200 and 400 <= height <= 700
    assert _temp_files(tmp_path) == []
    # A curve (and a legend line) in the colour of each class with ground truth, none for the
    # class without (bird). The lines are antialiased and drawn at alpha 0.9: near the colour.
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    near = {name: int((np.abs(pixels - class_color(k)).max(axis=2) <= 30).sum()) for k, name in enumerate(class_names)}
    assert near["cat"] > 200 and near["dog"] > 200 and near["bird"] == 0, near
    with pytest.raises(ValueError, match="class names"):
        plot_precision_recall(evaluator.eval["precision"], evaluator.params.recThrs, class_names[:2],
                              tmp_path / "bad.png")


def test_pr_plot_with_many_classes(tmp_path):
    rng = np.random.default_rng(1)
    precision = np.sort(rng.uniform(0, 1, size=(10, 101, 80, 4, 3)), axis=1)[:, ::-1]
    precision[:, :, 7] = -1
    path = plot_precision_recall(precision, np.linspace(0, 1, 101), [f"c{k}" for k in range(80)],
                                 tmp_path / "pr.png", iou_index=(IOU_50_INDEX,))
    assert _png_size(path)[0] > 0


# ---------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------
BACKGROUND = 128  # grey: no palette colour is grey, so every drawn pixel differs from it


def _inside(mask_shape, boxes) -> torch.Tensor:
    inside = torch.zeros(mask_shape, dtype=torch.bool)
    for x0, y0, x1, y1 in boxes:
        inside[int(y0):int(y1) + 1, int(x0):int(x1) + 1] = True
    return inside


def _outline(mask_shape, box) -> torch.Tensor:
    x0, y0, x1, y1 = (int(v) for v in box)
    edge = torch.zeros(mask_shape, dtype=torch.bool)
    edge[y0, x0:x1 + 1] = edge[y1, x0:x1 + 1] = True
    edge[y0:y1 + 1, x0] = edge[y0:y1 + 1, x1] = True
    return edge


def test_draw_detections_changes_only_the_boxes_it_draws():
    image = torch.full((3, 120, 200), BACKGROUND, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 10.0, 110.0, 60.0], [120.0, 70.0, 190.0, 115.0], [20.0, 75.0, 100.0, 110.0]])
    labels = torch.tensor([0, 1, 2])
    scores = torch.tensor([0.87, 0.5, 0.1])  # the third is under the threshold
    drawn = draw_detections(image, boxes, labels, scores, ["cat", "dog", "bird"], score_threshold=0.3)

    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape
    assert torch.equal(image, torch.full_like(image, BACKGROUND))  # input untouched
    changed = (drawn != image).any(dim=0)
    kept = boxes[:2].tolist()
    assert not (changed & ~_inside(changed.shape, kept)).any(), "pixels changed outside the drawn boxes"
    for box in kept:
        assert changed[_outline(changed.shape, box)].all(), "a box outline was not drawn"
    assert not changed[_inside(changed.shape, boxes[2:].tolist())].any(), "a box under the threshold was drawn"
    # Each class in its own fixed colour.
    assert tuple(drawn[:, 10, 60].tolist()) == class_color(0)
    assert tuple(drawn[:, 115, 150].tolist()) == class_color(1)


def test_ground_truth_is_drawn_without_scores_and_from_pil():
    pil_image = Image.new("RGB", (160, 100), (BACKGROUND,) * 3)
    drawn = draw_detections(pil_image, [[10, 10, 150, 90]], [1], None, ["cat", "dog"])
    changed = (drawn != BACKGROUND).any(dim=0)
    assert changed[_outline(changed.shape, (10, 10, 150, 90))].all()
    assert not (changed & ~_inside(changed.shape, [(10, 10, 150, 90)])).any()


def test_draw_detections_with_nothing_to_draw_returns_a_copy():
    image = torch.full((3, 32, 32), BACKGROUND, dtype=torch.uint8)
    drawn = draw_detections(image, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), torch.zeros(0), ["cat"])
    assert torch.equal(drawn, image) and drawn.data_ptr() != image.data_ptr()
    nan_box = draw_detections(image, [[float("nan"), 1.0, 20.0, 20.0]], [0], [0.9], ["cat"])
    assert torch.equal(nan_box, image)


def test_palette_is_fixed_and_distinct():
    palette = [class_color(k) for k in range(80)]
    assert palette == [class_color(k) for k in range(80)] and palette[:10] == [class_color(k) for k in range(10)]
    assert len(set(palette)) == 80
    assert all(max(c) - min(c) > 40 for c in palette)  # saturated, never grey


def test_side_by_side_pads_the_shorter_image(tmp_path):
    left = torch.full((3, 40, 30), 10, dtype=torch.uint8)
    right = torch.full((3, 25, 50), 200, dtype=torch.uint8)
    combined = side_by_side(left, right, gap=4)
    assert combined.shape == (3, 40, 30 + 4 + 50) and combined.dtype == torch.uint8
    assert torch.equal(combined[:, :40, :30], left)
    assert torch.equal(combined[:, :25, 34:], right)
    assert (combined[:, 25:, 34:] == 0).all()  # padding below the shorter image

    for name in ("pair.jpg", "pair.png"):
        path = save_image(combined, tmp_path / "vis" / name)
        with Image.open(path) as image:
            assert image.size == (84, 40)
    assert _temp_files(tmp_path / "vis") == []
    assert math.isclose(np.asarray(Image.open(tmp_path / "vis" / "pair.png"))[0, 0, 0], 10)
