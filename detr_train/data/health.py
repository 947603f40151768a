"""A look at the labels before training: what the run will learn from, and what it lost.

`health_report(bundle)` counts, for the training and the evaluation images a run uses,
boxes per class and per COCO size bucket, images without boxes, the boxes loading dropped
or clipped (`data.coco`, per annotation file), the boxes the training pipeline drops
every epoch, and the classes without a single training box. The run logs it and writes
it to `data_report.json` (`write_report`).

What the pipeline drops. The augmentation keeps every box of which at least
`augment.MIN_BOX_SIDE` pixel of the source image is left (a crop cuts the others away),
whatever the resize does to it, and the image processor keeps every box of positive size;
so the boxes lost every epoch are those thinner than that to begin with, when an augmenter
runs. (The HF example script's augmentation drops boxes under 25 px² instead: most of
BDD100K's traffic lights.)

Size buckets are COCOeval's, on the annotations' `area` as COCOeval reads it: small below
32², medium below 96², large from there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from detr_train.checkpointing.atomic import atomic_write
from detr_train.data.augment import MIN_BOX_SIDE
from detr_train.data.build import DataBundle
from detr_train.data.coco import CocoDetectionDataset

log = logging.getLogger(__name__)

REPORT_FILE = "data_report.json"
SIZE_BUCKETS = (("small", 32**2), ("medium", 96**2), ("large", float("inf")))
THIN = f"thinner than {MIN_BOX_SIDE:g} px"


def size_bucket(area: float) -> str:
    return next(name for name, upper in SIZE_BUCKETS if area < upper)


def dataset_report(dataset: CocoDetectionDataset, *, pipeline_drops_thin_boxes: bool) -> dict[str, Any]:
    """Counts for the images of `dataset` (a subset counts its own images; load counts are its file's)."""
    names = dataset.categories.names
    per_class = {name: {"boxes": 0, "images": 0, **{bucket: 0 for bucket, _ in SIZE_BUCKETS}} for name in names}
    per_size = {bucket: 0 for bucket, _ in SIZE_BUCKETS}
    boxes = crowd = empty = thin = 0
    for index in range(len(dataset)):
        seen: set[str] = set()
        for ann in dataset.annotations_of(index):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            name = names[dataset.categories.label(ann["category_id"])]
            bucket = size_bucket(float(ann["area"]))
            per_class[name]["boxes"] += 1
            per_class[name][bucket] += 1
            per_size[bucket] += 1
            boxes += 1
            seen.add(name)
            thin += min(ann["bbox"][2], ann["bbox"][3]) < MIN_BOX_SIDE
        for name in seen:
            per_class[name]["images"] += 1
        empty += not seen
    return {
        "annotation_file": str(dataset.ann_file),
        "images": len(dataset),
        "images_without_boxes": empty,
        "boxes": boxes,
        "crowd_regions": crowd,
        "boxes_per_size": per_size,
        "boxes_per_class": per_class,
        "dropped_at_load": dict(sorted(dataset.load_counts.dropped.items())),
        "clipped_at_load": dataset.load_counts.clipped,
        "dropped_by_pipeline": {THIN: thin} if pipeline_drops_thin_boxes and thin else {},
    }


def health_report(bundle: DataBundle) -> dict[str, Any]:
    """The report of a run's data (training and evaluation images), logged as it is made."""
    train = dataset_report(bundle.train, pipeline_drops_thin_boxes=bundle.train.augmenter is not None)
    val = dataset_report(bundle.val, pipeline_drops_thin_boxes=False)
    missing = [name for name, counts in train["boxes_per_class"].items() if counts["boxes"] == 0]
    factors = bundle.repeat_factors
    report = {
        "classes": list(bundle.class_names),
        "splits": {"train": train, "val": val},
        "classes_without_training_boxes": missing,
        "repeat_factors": None if factors is None else {
            "threshold": factors.threshold,
            "expected_epoch_length": factors.expected_epoch_length,
            "per_class": {bundle.class_names[label]: r for label, r in factors.per_class.items()},
        },
    }
    _log_report(report)
    return report


def _log_report(report: dict[str, Any]) -> None:
    for split, counts in report["splits"].items():
        classes = ", ".join(f"{name} {c['boxes']} ({c['small']}/{c['medium']}/{c['large']})"
                            for name, c in counts["boxes_per_class"].items())
        log.info("Data %s: %d images (%d without boxes), %d boxes; per class (small/medium/large): %s",
                 split, counts["images"], counts["images_without_boxes"], counts["boxes"], classes)
        at_load, by_pipeline = counts["dropped_at_load"], counts["dropped_by_pipeline"]
        if at_load or by_pipeline or counts["clipped_at_load"]:
            log.info("Data %s: %d box(es) clipped to their image; dropped at load: %s; dropped every epoch by the "
                     "augmentation: %s", split, counts["clipped_at_load"], _counted(at_load), _counted(by_pipeline))
    if report["classes_without_training_boxes"]:
        log.warning("No training box of class(es) %s: the model cannot learn them (check the subset, the "
                    "budget and the annotation file)", ", ".join(report["classes_without_training_boxes"]))


def _counted(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in reasons.items()) or "none"


def write_report(report: dict[str, Any], run_dir: Path) -> Path:
    """`data_report.json` in the run dir; the same data gives the same bytes (a resume rewrites it unchanged)."""
    return atomic_write(Path(run_dir) / REPORT_FILE, json.dumps(report, indent=2) + "\n")
