"""BDD100K detection labels -> COCO json, and the preparation step behind `data=bdd100k`.

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

`prepare(data_cfg)` is what `detr_train.data.sources.prepare_dataset` calls for
`data.name == "bdd100k"`: it checks the standard layout under `data.root`
(`images/100k/{train,val}`, `labels/det_20/det_{train,val}.json`), converts each label
file on first use into `<labels dir>/coco/<stem>_<uncertain>.json` (reused while newer
than its source) and returns the COCO paths. Annotation files that are already COCO
json are used as they are.

Command line: `detr-train-bdd2coco det_val.json det_val_coco.json [--images-dir DIR]
[--uncertain {ignore,remove,merge}]` (or `python -m detr_train.data.bdd100k`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detr_train.atomic import atomic_write
from detr_train.data.sources import DatasetError, SplitPaths, resolve_under_root

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

DEFAULT_WIDTH, DEFAULT_HEIGHT = 1280, 720
DESCRIPTION = "BDD100K detection labels converted to COCO by detr_train"

# Layout of the official download, relative to data.root (also the config defaults).
STANDARD_LAYOUT = (
    "<root>/images/100k/{train,val}/*.jpg\n"
    "<root>/labels/det_20/det_{train,val}.json"
)

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
        where = _frame_location(source, index, frame)
        name = _frame_name(frame, where)
        size = _image_size(frame, name, images_dir, where)
        if size is None:
            stats.missing_images.append(name)
            continue
        image_id = len(images) + 1
        width, height = size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for label in _frame_labels(frame, where):
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
    corners = _box_corners(label["box2d"], where)
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
    crowd = _is_crowd(label, where)
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


def _frame_location(source: str, index: int, frame: Any) -> str:
    name = frame.get("name") if isinstance(frame, dict) else None
    return f"{source}: frame {index}" + (f" ({name})" if isinstance(name, str) else "")


def _frame_name(frame: Any, where: str) -> str:
    if not isinstance(frame, dict):
        raise DatasetError(f"{where}: expected an object with 'name' and 'labels', got {type(frame).__name__}")
    name = frame.get("name")
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: 'name' (the image file name) is missing or not a string")
    return name


def _frame_labels(frame: dict[str, Any], where: str) -> list[Any]:
    labels = frame.get("labels")
    if labels is None:  # frames without objects: absent or null in the official files
        return []
    if not isinstance(labels, list):
        raise DatasetError(f"{where}: 'labels' must be a list, got {type(labels).__name__}")
    return labels


def _box_corners(box: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(box, dict):
        raise DatasetError(f"{where}: 'box2d' must be an object with x1, y1, x2, y2")
    corners = []
    for key in ("x1", "y1", "x2", "y2"):
        value = box.get(key)
        if not _is_number(value):
            raise DatasetError(f"{where}: box2d.{key} must be a finite number, got {value!r}")
        corners.append(value)
    return tuple(corners)  # type: ignore[return-value]


def _is_number(value: Any) -> bool:
    # JSON true/false parse as bool, a subclass of int: not a coordinate.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_crowd(label: dict[str, Any], where: str) -> bool:
    attributes = label.get("attributes")
    if attributes is None:
        return False
    if not isinstance(attributes, dict):
        raise DatasetError(f"{where}: 'attributes' must be an object, got {type(attributes).__name__}")
    return bool(attributes.get("crowd", False))


def _image_size(
    frame: dict[str, Any], name: str, images_dir: Path | None, where: str
) -> tuple[int, int] | None:
    """(width, height) of a frame's image, or None when its file is missing."""
    if images_dir is not None and not (images_dir / name).is_file():
        return None
    if frame.get("size") is not None:
        return _declared_size(frame["size"], where)
    if images_dir is not None:
        return _read_image_size(images_dir / name)
    return DEFAULT_WIDTH, DEFAULT_HEIGHT


def _declared_size(size: Any, where: str) -> tuple[int, int]:
    if not isinstance(size, dict):
        raise DatasetError(f"{where}: 'size' must be an object with width and height")
    values = []
    for key in ("width", "height"):
        value = size.get(key)
        if not _is_number(value) or value <= 0 or value != int(value):
            raise DatasetError(f"{where}: size.{key} must be a positive integer, got {value!r}")
        values.append(int(value))
    return values[0], values[1]


def _read_image_size(path: Path) -> tuple[int, int]:
    from PIL import Image  # imported here: `--help` should not pay for it

    try:
        with Image.open(path) as image:  # reads the header only, not the pixels
            return image.size
    except OSError as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


# --------------------------------------------------------------------------------------
# Files


def load_bdd_frames(path: Path) -> list[Any]:
    """Parse a BDD100K label file into its list of frames, with clear format errors."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a UTF-8 JSON text file ({error})") from error
    if isinstance(data, dict) and isinstance(data.get("frames"), list):
        return data["frames"]  # Scalabel's dataset wrapper: {"config": ..., "frames": [...]}
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        raise DatasetError(
            f"{path}: this is already COCO json (it has 'images' and 'annotations'); "
            "use it directly as data.train_ann / data.val_ann"
        )
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected the BDD100K detection format, a JSON list of frames "
            f"({{'name', 'labels'}}), got a JSON {type(data).__name__}"
        )
    return data


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


def prepare(data_cfg) -> SplitPaths:
    """Check the BDD100K layout under `data.root`, convert labels if needed, return COCO paths.

    Each `*_ann` may be an official BDD100K label file (converted once into a cache,
    `data.cache_dir` or `<labels dir>/coco/`) or an already-converted COCO json (used as
    is). Raises `DatasetError` listing every missing path when the layout is wrong.
    """
    root = Path(str(data_cfg.root)).expanduser()
    uncertain = check_uncertain_handling(str(data_cfg.get("uncertain", "ignore")))
    cache_dir = data_cfg.get("cache_dir")
    paths = SplitPaths(
        train_images=resolve_under_root(root, data_cfg.train_images),
        train_ann=resolve_under_root(root, data_cfg.train_ann),
        val_images=resolve_under_root(root, data_cfg.val_images),
        val_ann=resolve_under_root(root, data_cfg.val_ann),
    )
    check_layout(root, paths)
    cache = None if cache_dir is None else resolve_under_root(root, cache_dir)
    return SplitPaths(
        train_images=paths.train_images,
        train_ann=coco_annotations(paths.train_ann, paths.train_images, uncertain, cache),
        val_images=paths.val_images,
        val_ann=coco_annotations(paths.val_ann, paths.val_images, uncertain, cache),
    )


def check_layout(root: Path, paths: SplitPaths) -> None:
    """Raise one DatasetError that lists everything missing, not just the first thing."""
    missing = []
    if not root.is_dir():
        missing.append(f"data.root: {root} (not a folder)")
    for key, path, want_dir in (
        ("data.train_images", paths.train_images, True),
        ("data.val_images", paths.val_images, True),
        ("data.train_ann", paths.train_ann, False),
        ("data.val_ann", paths.val_ann, False),
    ):
        if not (path.is_dir() if want_dir else path.is_file()):
            missing.append(f"{key}: {path} ({'folder' if want_dir else 'file'})")
    if missing:
        raise DatasetError(
            f"BDD100K dataset under {root} is incomplete; missing:\n"
            + "\n".join(f"  - {line}" for line in missing)
            + f"\nExpected the official layout:\n{STANDARD_LAYOUT}\n"
            "Set data.root to the folder that holds images/ and labels/, or point "
            "data.train_images / data.val_images / data.train_ann / data.val_ann at your "
            "files (relative to data.root or absolute; *_ann may also be COCO json)."
        )


def coco_annotations(ann_path: Path, images_dir: Path, uncertain: str, cache_dir: Path | None) -> Path:
    """The COCO json for one split: the file itself if it is COCO, else its cached conversion."""
    if label_file_kind(ann_path) == "coco":
        log.info("using COCO annotations %s as they are", ann_path)
        return ann_path
    cache_dir = cache_dir if cache_dir is not None else ann_path.parent / "coco"
    cached = cache_dir / f"{ann_path.stem}_{uncertain}.json"
    if cached.is_file() and cached.stat().st_mtime >= ann_path.stat().st_mtime:
        log.info("using converted labels %s (delete it to convert %s again)", cached, ann_path)
        return cached
    try:
        convert_file(ann_path, cached, uncertain=uncertain, images_dir=images_dir)
    except OSError as error:
        raise DatasetError(
            f"cannot write converted labels to {cached} ({error}); set data.cache_dir to a "
            "writable folder"
        ) from error
    return cached


_FIRST_KEY = re.compile(r'^\{\s*"((?:[^"\\]|\\.)*)"')


def label_file_kind(path: Path) -> str:
    """'bdd' or 'coco', from the start of the file (label files are too big to parse twice).

    BDD100K files are a JSON list of frames, or Scalabel's {"config"/"frames": ...}
    object; any other JSON object is taken for COCO json.
    """
    with open(path, "rb") as file:
        head = file.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith("["):
        return "bdd"
    if head.startswith("{"):
        match = _FIRST_KEY.match(head)
        return "bdd" if match and match.group(1) in ("frames", "config", "groups") else "coco"
    raise DatasetError(f"{path}: not a JSON label file (it should start with '[' or '{{')")


# --------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="detr-train-bdd2coco",
        description=(
            "Convert BDD100K detection labels (labels/det_20/det_{train,val}.json) to COCO "
            "json with the ten det_20 classes (ids 1-10: "
            + ", ".join(CATEGORIES)
            + "). Boxes become [x, y, x2-x1+1, y2-y1+1] as in the official toolkit."
        ),
        epilog=(
            "example: detr-train-bdd2coco bdd100k/labels/det_20/det_val.json det_val_coco.json "
            "--images-dir bdd100k/images/100k/val"
        ),
    )
    parser.add_argument("input", type=Path, help="BDD100K label json (a list of frames)")
    parser.add_argument("output", type=Path, help="COCO json to write (replaced atomically)")
    parser.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "folder with the images: frames whose image is missing are dropped (with a "
            "warning) and frames without a 'size' get their real size from the file; "
            "without it every frame is taken as 1280x720 unless it has a 'size'"
        ),
    )
    parser.add_argument(
        "--uncertain",
        choices=UNCERTAIN_HANDLINGS,
        default="ignore",
        help=(
            "what to do with 'other person', 'other vehicle' and 'trailer': ignore = keep "
            "as ignore regions of the nearest class (iscrowd=1; COCOeval neither rewards "
            "nor penalises detections there; default), remove = drop them, merge = count "
            "them as pedestrian / car / truck"
        ),
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        convert_file(args.input, args.output, uncertain=args.uncertain, images_dir=args.images_dir)
    except (DatasetError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
