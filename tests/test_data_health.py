"""The data health report (data_report.json and its log lines), and the promise behind its
'dropped by the pipeline' count: no step of the training pipeline drops a small box that
stays inside the image, whatever the augment preset."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from detr_train.config import config_dir
from detr_train.config.schema import BudgetConfig
from detr_train.data.augment import AugmentPlan
from detr_train.data.build import build_augmenter, build_data
from detr_train.data.coco import CocoDetectionDataset, SampleRequest
from detr_train.data.collate import DetrCollator
from detr_train.data.health import REPORT_FILE, dataset_report, health_report, write_report
from detr_train.modeling.build import build_image_processor
from tests.conftest import compose_config

AUGMENT_PRESETS = sorted((config_dir() / "data" / "augment").glob("*.yaml"))
WIDTH, HEIGHT = 1280, 720  # a BDD100K frame
GRID = 40  # one 2x2 px box every 40 px, each its own class


def _write_coco(root: Path, images: list[dict], annotations: list[dict], names: list[str]) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image in images:
        Image.new("RGB", (image["width"], image["height"]), (90, 90, 90)).save(root / "images" / image["file_name"])
    for number, ann in enumerate(annotations, 1):
        ann.setdefault("id", number)
        ann.setdefault("iscrowd", 0)
    categories = [{"id": number, "name": name} for number, name in enumerate(names, 1)]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


# --- no step drops a small box that stays inside --------------------------------------------


def _grid_of_tiny_boxes(root: Path) -> Path:
    boxes = [[x, y, 2.0, 2.0] for y in range(0, HEIGHT - 1, GRID) for x in range(0, WIDTH - 1, GRID)]
    boxes.append([WIDTH - 2.0, HEIGHT - 2.0, 2.0, 2.0])  # in the bottom-right corner
    annotations = [{"image_id": 1, "category_id": n, "bbox": box, "area": 4.0} for n, box in enumerate(boxes, 1)]
    return _write_coco(root, [{"id": 1, "file_name": "frame.png", "width": WIDTH, "height": HEIGHT}],
                       annotations, [f"box{n}" for n in range(1, len(boxes) + 1)])


def _inside_output(box: list[float], plan: AugmentPlan) -> bool:
    """Whether a source box lies wholly inside what the augmented image shows (its crop window)."""
    # The geometry below knows flips and the crop branch; a plan with other fields needs it extended.
    assert {f.name for f in dataclasses.fields(AugmentPlan)} == {"flip", "crop_resize", "crop", "final_size",
                                                                  "jitter", "tile"}, "teach _inside_output the new plan"
    x, y, w, h = box
    if plan.flip:
        x = WIDTH - x - w
    if plan.tile is not None:  # a native-resolution window of the (flipped) image
        tile = plan.tile
        return tile.left <= x and x + w <= tile.left + tile.width and tile.top <= y and y + h <= tile.top + tile.height
    if plan.crop is None:
        return True
    sy, sx = plan.crop_resize[0] / HEIGHT, plan.crop_resize[1] / WIDTH
    window = plan.crop
    return (window.left <= x * sx and (x + w) * sx <= window.left + window.width
            and window.top <= y * sy and (y + h) * sy <= window.top + window.height)


def _samples_to_check(augmenter, base_size: int) -> list[int]:
    """Epochs whose draw takes the crop branch (two) and epochs whose draw does not (two)."""
    cropped, whole = [], []
    for epoch in range(1, 200):
        plan = augmenter.plan(HEIGHT, WIDTH, seed=0, epoch=epoch, index=0, base_size=base_size)
        (cropped if plan.crop is not None else whole).append(epoch)
    return cropped[:2] + whole[:2]


@pytest.mark.parametrize("preset", AUGMENT_PRESETS, ids=lambda path: path.stem)
def test_no_step_drops_a_2px_box_that_stays_inside_the_image(preset, tmp_path):
    ann = _grid_of_tiny_boxes(tmp_path)
    # The COCO preset's sizes (800, ratio 1.667): at base 800 and at a schedule's early 400.
    data_cfg = compose_config(["data=coco", f"data.root={tmp_path}", f"data/augment={preset.stem}"]).data
    augmenter = build_augmenter(data_cfg)
    dataset = CocoDetectionDataset(tmp_path / "images", ann, augmenter=augmenter, seed=0)
    collate = DetrCollator(build_image_processor(data_cfg.eval_size, data_cfg.max_size_ratio), data_cfg.max_size_ratio)
    all_boxes = [ann["bbox"] for ann in dataset.annotations_of(0)]
    smallest_side = float("inf")
    for base_size in (800, 400):
        epochs = _samples_to_check(augmenter, base_size) if augmenter is not None else [1]
        for epoch in epochs:
            batch = collate([dataset[SampleRequest(0, base_size, epoch)]])
            target = batch["labels"][0]
            kept = set(target["class_labels"].tolist())
            plan = augmenter.plan(HEIGHT, WIDTH, seed=0, epoch=epoch, index=0, base_size=base_size,
                                  boxes_xywh=all_boxes) \
                if augmenter is not None else AugmentPlan(False, None, None, None, ())
            inside = {label for label, box in enumerate(all_boxes) if _inside_output(box, plan)}
            assert len(inside) > (3 if augmenter is not None and augmenter.tile_size else 20)
            assert inside <= kept, f"base {base_size}, epoch {epoch}: lost boxes {sorted(inside - kept)[:10]}"
            # One image: no padding, and the processor's boxes are fractions of its width.
            smallest_side = min(smallest_side, float(target["boxes"][:, 2].min()) * batch["pixel_values"].shape[-1])
    if augmenter is not None and augmenter.tile_size is not None:
        # Tiles keep native pixels: nothing shrank; the smallest is a box the tile's border cut
        # in half (min_visible 0.5 keeps it, clipped).
        assert smallest_side == pytest.approx(1.0)
    else:
        # The sizes above shrink the frame: the boxes reached the model smaller than they were drawn.
        assert smallest_side < 1.2


# --- the report --------------------------------------------------------------------------


def _two_splits(root: Path) -> tuple[Path, Path]:
    """A training file with every kind of box the report counts, and a validation file."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 100} for i in (1, 2, 3)]
    train = _write_coco(root / "train", images, [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0},  # small (100 < 32²)
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600.0},  # medium
        {"image_id": 1, "category_id": 2, "bbox": [0, 0, 150, 99], "area": 9900.0},  # large (9900 >= 96²)
        {"image_id": 2, "category_id": 2, "bbox": [190, 90, 20, 20], "area": 400.0},  # clipped to 10x10
        {"image_id": 2, "category_id": 2, "bbox": [5, 5, 0.5, 4], "area": 2.0},  # thinner than 1 px
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 4]},  # dropped at load: zero width
        {"image_id": 2, "category_id": 1, "bbox": [300, 5, 4, 4]},  # dropped at load: outside
        {"image_id": 2, "category_id": 1, "bbox": [20, 20, 50, 50], "area": 2500.0, "iscrowd": 1},
    ], ["car", "rider", "train"])  # image 3 has no box; no training box is a train
    val = _write_coco(root / "val", images[:2], [
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25.0},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 100, 100], "area": 10000.0},
    ], ["car", "rider", "train"])
    return train, val


def test_dataset_report_counts_classes_sizes_empty_images_and_what_loading_did(tmp_path):
    train_ann, _ = _two_splits(tmp_path)
    dataset = CocoDetectionDataset(tmp_path / "train" / "images", train_ann)
    report = dataset_report(dataset, pipeline_drops_thin_boxes=True)
    assert report == {
        "annotation_file": str(train_ann),
        "images": 3,
        "images_without_boxes": 1,
        "boxes": 5,
        "crowd_regions": 1,
        "boxes_per_size": {"small": 3, "medium": 1, "large": 1},
        "boxes_per_class": {
            "car": {"boxes": 2, "images": 1, "small": 1, "medium": 1, "large": 0},
            "rider": {"boxes": 3, "images": 2, "small": 2, "medium": 0, "large": 1},
            "train": {"boxes": 0, "images": 0, "small": 0, "medium": 0, "large": 0},
        },
        "dropped_at_load": {"non-positive width or height": 1, "outside the image": 1},
        "clipped_at_load": 1,
        "dropped_by_pipeline": {"thinner than 1 px": 1},
    }
    # A subset counts its own images and boxes; what loading did is the file's.
    first = dataset_report(dataset.subset([1]), pipeline_drops_thin_boxes=False)
    assert (first["images"], first["boxes"], first["boxes_per_size"]) == (1, 3, {"small": 1, "medium": 1, "large": 1})
    assert first["dropped_at_load"] == report["dropped_at_load"] and first["dropped_by_pipeline"] == {}


def test_the_report_is_logged_warns_of_classes_without_training_boxes_and_is_written(tmp_path, caplog):
    _two_splits(tmp_path)
    cfg = compose_config(["data=coco", f"data.root={tmp_path}", "data.train_images=train/images",
                          "data.val_images=val/images", "data.train_ann=train/ann.json",
                          "data.val_ann=val/ann.json", "data/augment=flip", "data.num_workers=0"])
    bundle = build_data(cfg.data, cfg.training, BudgetConfig())
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="detr_train"):
        report = health_report(bundle)
        path = write_report(report, run_dir)
    assert path == run_dir / REPORT_FILE and json.loads(path.read_text()) == report
    assert report["splits"]["train"] == dataset_report(bundle.train, pipeline_drops_thin_boxes=True)
    assert report["splits"]["val"]["boxes_per_class"]["train"] == {"boxes": 2, "images": 2, "small": 1,
                                                                   "medium": 0, "large": 1}
    assert report["classes_without_training_boxes"] == ["train"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no training box of class(es) train" in w.lower() for w in warnings), warnings
    # A resumed run rewrites the same bytes.
    before = path.read_bytes()
    write_report(health_report(bundle), run_dir)
    assert path.read_bytes() == before
