"""BDD100K detection labels -> COCO json.

Input is the official detection label format (`labels/det_20/det_{train,val}.json`): a
JSON list of frames, each `{"name": ..., "attributes": {...}, "labels": [...]}`, each
label `{"id", "category", "attributes": {"occluded", "truncated", "crowd", ...},
"box2d": {"x1", "y1", "x2", "y2"}}`. The older combined files
(`bdd100k_labels_images_*.json`) and Scalabel's `{"frames": [...]}` wrapper convert too.

What the conversion does, following the official toolkit (bdd100k/label/to_coco.py with
Scalabel's `box2d_to_bbox`):

- ten classes with fixed ids 1..10, in the order of `CATEGORIES`; the older names
  `person`, `bike`, `motor`, `van`, `caravan` are read as their det_20 equivalents;
- boxes go from corners to `[x, y, w, h]` with `w = x2 - x1 + 1`, `h = y2 - y1 + 1`
  (BDD corners are inclusive pixel coordinates); `area = w * h`;
- the uncertain classes `other person`, `other vehicle`, `trailer` are, per
  `uncertain=`:
    `ignore` (default) kept as ignore regions: mapped to the nearest class
             (pedestrian, car, truck) with `iscrowd=1, ignore=1`, so COCOeval neither
             rewards nor penalises detections there;
    `remove` dropped;
    `merge`  counted as ordinary boxes of the nearest class;
- the label attribute `crowd: true` gives `iscrowd=1` (with `ignore=0`);
- labels without `box2d` (lanes, drivable areas) are skipped;
- frames without labels stay, as images without annotations;
- image size: the frame's own `size` if the file has one, else the image file's header
  when an images folder is given, else 1280x720.

Bad input, and what happens (nothing is written when an error is raised):

- file not JSON, not a list of frames, or a frame / label / box with a missing or
  mistyped key: `DatasetError` naming the file, the frame (index and name) and the key;
- a file that is already COCO json given to the converter: `DatasetError` saying so
  (`prepare` uses such a file as is);
- unknown category names: `DatasetError` listing every unknown name with its count and
  the first frame it appears in;
- inverted box (x2 < x1 or y2 < y1): counted warning, the box is dropped;
- image listed but missing from the images folder: counted warning, the frame is left
  out; `DatasetError` if none of the listed images exists (wrong folder); an image that
  exists but cannot be read: `DatasetError` naming it.

`data=bdd100k` prepares the dataset with `detr_train.data.bdd100k_layout`.
Command line: `detr-train-bdd2coco` (`detr_train.cli.bdd2coco`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detr_train.checkpointing.atomic import atomic_write
from detr_train.data.bdd100k_frames import (
    box_corners,
    frame_labels,
    frame_location,
    frame_name,
    image_size,
    is_crowd,
    load_bdd_frames,
)
from detr_train.data.sources import DatasetError

log = logging.getLogger(__name__)

# The ten det_20 classes; a class's COCO id is its 1-based position here, in every file
# we write, so checkpoints trained on one conversion evaluate on any other.
CATEGORIES: tuple[str, ...] = (
    "pedestrian",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "traffic light",
    "traffic sign",
)
CATEGORY_IDS: dict[str, int] = {name: index for index, name in enumerate(CATEGORIES, start=1)}
SUPERCATEGORIES: dict[str, str] = {
    "pedestrian": "human",
    "rider": "human",
    "car": "vehicle",
    "truck": "vehicle",
    "bus": "vehicle",
    "train": "vehicle",
    "motorcycle": "bike",
    "bicycle": "bike",
    "traffic light": "traffic",
    "traffic sign": "traffic",
}

# Classes the annotators used for "something is there but it is not one of the ten";
# the official toolkit maps each to its nearest class when it keeps them.
UNCERTAIN_NEAREST: dict[str, str] = {
    "other person": "pedestrian",
    "other vehicle": "car",
    "trailer": "truck",
}
UNCERTAIN_HANDLINGS: tuple[str, ...] = ("ignore", "remove", "merge")

# Names used by the 2018 combined label files (bdd100k_labels_images_*.json).
LEGACY_NAMES: dict[str, str] = {
    "person": "pedestrian",
    "bike": "bicycle",
    "motor": "motorcycle",
    "van": "car",
    "caravan": "car",
}

DESCRIPTION = "BDD100K detection labels converted to COCO by detr_train"

_EXAMPLES_SHOWN = 5  # how many offending items a warning or error lists by name


# --------------------------------------------------------------------------------------
# Conversion


@dataclass
class ConversionStats:
    """What a conversion kept, changed and dropped; logged as its summary."""

    frames: int = 0
    images: int = 0
    annotations: int = 0
    per_category: Counter = field(default_factory=Counter)
    crowd: int = 0  # boxes with iscrowd=1 from the `crowd` attribute
    ignore_regions: int = 0  # uncertain-class boxes kept as ignore regions
    merged: int = 0  # uncertain-class boxes merged into their nearest class
    removed: int = 0  # uncertain-class boxes dropped
    without_box: int = 0  # lanes, drivable areas, ...
    inverted_boxes: list[str] = field(default_factory=list)  # "<file>: frame 5 (x.jpg), label 12"
    missing_images: list[str] = field(default_factory=list)


@dataclass
class ConversionResult:
    coco: dict[str, Any]
    stats: ConversionStats


def coco_categories() -> list[dict[str, Any]]:
    return [
        {"id": CATEGORY_IDS[name], "name": name, "supercategory": SUPERCATEGORIES[name]}
        for name in CATEGORIES
    ]


def corners_to_xywh(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """BDD corners are inclusive pixels: a box from x1=10 to x2=10 is one pixel wide."""
    return [float(x1), float(y1), float(x2 - x1 + 1), float(y2 - y1 + 1)]


def check_uncertain_handling(value: str) -> str:
    if value not in UNCERTAIN_HANDLINGS:
        raise DatasetError(
            f"data.uncertain / --uncertain must be one of {', '.join(UNCERTAIN_HANDLINGS)}, "
            f"got {value!r}"
        )
    return value


def convert_frames(
    frames: list[Any],
    *,
    uncertain: str = "ignore",
    images_dir: Path | None = None,
    source: str = "<frames>",
) -> ConversionResult:
    """Convert BDD100K frames (already parsed JSON) to a COCO detection dict.

    `images_dir`, when given, is where the frames' images are: listed images that are
    missing there are left out, and frames without a `size` get their real one from
    the image header. `source` names the input in error messages.
    """
    check_uncertain_handling(uncertain)
    if not isinstance(frames, list):
        raise DatasetError(f"{source}: expected a list of frames, got {type(frames).__name__}")

    stats = ConversionStats(frames=len(frames))
    unknown = _UnknownCategories()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []

    for index, frame in enumerate(frames):
        where = frame_location(source, index, frame)
        name = frame_name(frame, where)
        size = image_size(frame, name, images_dir, where)
        if size is None:
            stats.missing_images.append(name)
            continue
        image_id = len(images) + 1
        width, height = size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for label in frame_labels(frame, where):
            annotation = _label_annotation(label, uncertain, stats, unknown, f"{where}, label")
            if annotation is not None:
                annotation.update(id=len(annotations) + 1, image_id=image_id)
                annotations.append(annotation)

    unknown.raise_if_any(source)
    if stats.missing_images and not images:
        raise DatasetError(
            f"{source}: none of the {len(stats.missing_images)} images it lists were found in "
            f"{images_dir} (first: {stats.missing_images[0]}); is the images folder right?"
        )
    stats.images = len(images)
    stats.annotations = len(annotations)
    coco = {
        "info": {"description": DESCRIPTION, "uncertain": uncertain},
        "images": images,
        # Key order inside each annotation is fixed for readable, diffable output.
        "annotations": [_ordered_annotation(a) for a in annotations],
        "categories": coco_categories(),
    }
    return ConversionResult(coco=coco, stats=stats)


def _label_annotation(
    label: Any,
    uncertain: str,
    stats: ConversionStats,
    unknown: _UnknownCategories,
    where: str,
) -> dict[str, Any] | None:
    """One label's COCO annotation (without ids), or None when the label is not kept."""
    if not isinstance(label, dict):
        raise DatasetError(f"{where}: expected an object, got {type(label).__name__}")
    where = f"{where} {label.get('id', '?')}"
    if label.get("box2d") is None:
        # Lanes and drivable areas (poly2d only) in the older combined files.
        stats.without_box += 1
        return None
    corners = box_corners(label["box2d"], where)
    category = label.get("category")
    if not isinstance(category, str):
        raise DatasetError(f"{where}: 'category' must be a string, got {category!r}")

    category = LEGACY_NAMES.get(category, category)
    is_uncertain = category in UNCERTAIN_NEAREST
    if is_uncertain:
        if uncertain == "remove":
            stats.removed += 1
            return None
        category = UNCERTAIN_NEAREST[category]
    elif category not in CATEGORY_IDS:
        unknown.add(category, where)
        return None

    x1, y1, x2, y2 = corners
    if x2 < x1 or y2 < y1:
        stats.inverted_boxes.append(where)
        return None

    ignore = is_uncertain and uncertain == "ignore"
    crowd = is_crowd(label, where)
    stats.crowd += crowd
    stats.ignore_regions += ignore
    stats.merged += is_uncertain and uncertain == "merge"
    stats.per_category[category] += 1
    bbox = corners_to_xywh(x1, y1, x2, y2)
    annotation: dict[str, Any] = {
        "category_id": CATEGORY_IDS[category],
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        # COCOeval ignores iscrowd=1 ground truth: a detection there is neither a true
        # nor a false positive. `ignore` mirrors the official converter's output.
        "iscrowd": int(crowd or ignore),
        "ignore": int(ignore),
    }
    if "id" in label:
        annotation["bdd100k_id"] = str(label["id"])
    return annotation


def _ordered_annotation(annotation: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "ignore", "bdd100k_id")
    return {key: annotation[key] for key in keys if key in annotation}


class _UnknownCategories:
    """Collects every unknown class name so that one error reports them all."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.first_seen: dict[str, str] = {}

    def add(self, category: str, where: str) -> None:
        self.counts[category] += 1
        self.first_seen.setdefault(category, where)

    def raise_if_any(self, source: str) -> None:
        if not self.counts:
            return
        listing = "\n".join(
            f"  - {name!r}: {count} box(es), first at {self.first_seen[name]}"
            for name, count in self.counts.most_common()
        )
        known = ", ".join(CATEGORIES + tuple(UNCERTAIN_NEAREST) + tuple(LEGACY_NAMES))
        raise DatasetError(
            f"{source}: unknown BDD100K categories:\n{listing}\nKnown categories: {known}"
        )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the complete new one, never half.

    Parallel jobs of a sweep may convert the same file at the same moment; each writes
    its own temp file and the last rename wins with identical content.
    """
    atomic_write(path, json.dumps(data, separators=(",", ":")))


def convert_file(
    input_path: Path,
    output_path: Path,
    *,
    uncertain: str = "ignore",
    images_dir: Path | None = None,
) -> ConversionStats:
    """Convert one BDD100K label file to a COCO json file (written atomically)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if input_path.resolve() == output_path.resolve():
        raise DatasetError(f"{input_path}: output would overwrite the input")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DatasetError(f"images folder {images_dir} does not exist")
    log.info("converting %s (uncertain classes: %s)", input_path, uncertain)
    frames = load_bdd_frames(input_path)
    result = convert_frames(
        frames,
        uncertain=uncertain,
        images_dir=None if images_dir is None else Path(images_dir),
        source=str(input_path),
    )
    write_json_atomic(output_path, result.coco)
    log_summary(result.stats, output_path)
    return result.stats


def log_summary(stats: ConversionStats, output_path: Path) -> None:
    log.info(
        "wrote %s: %d images (of %d frames), %d boxes; %d crowd, %d ignore regions, "
        "%d merged, %d uncertain removed, %d labels without box2d skipped",
        output_path,
        stats.images,
        stats.frames,
        stats.annotations,
        stats.crowd,
        stats.ignore_regions,
        stats.merged,
        stats.removed,
        stats.without_box,
    )
    log.info(
        "boxes per class (crowd boxes and ignore regions included): %s",
        ", ".join(f"{name}={stats.per_category.get(name, 0)}" for name in CATEGORIES),
    )
    _warn_with_examples(stats.inverted_boxes, "inverted boxes (x2 < x1 or y2 < y1) dropped")
    _warn_with_examples(stats.missing_images, "frames dropped because their image is missing")


def _warn_with_examples(items: list[str], what: str) -> None:
    if items:
        shown = "; ".join(items[:_EXAMPLES_SHOWN])
        more = f" and {len(items) - _EXAMPLES_SHOWN} more" if len(items) > _EXAMPLES_SHOWN else ""
        log.warning("%d %s: %s%s", len(items), what, shown, more)


# --------------------------------------------------------------------------------------
# data=bdd100k
