"""Reading BDD100K label files: frames, their labels, boxes and image sizes, with errors that
name the file, the frame (index and name) and the key at fault."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from detr_train.data.sources import DatasetError

# Frames without a `size`, and no images folder to read it from, are taken at BDD100K's size.
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1280, 720


def frame_location(source: str, index: int, frame: Any) -> str:
    name = frame.get("name") if isinstance(frame, dict) else None
    return f"{source}: frame {index}" + (f" ({name})" if isinstance(name, str) else "")


def frame_name(frame: Any, where: str) -> str:
    if not isinstance(frame, dict):
        raise DatasetError(f"{where}: expected an object with 'name' and 'labels', got {type(frame).__name__}")
    name = frame.get("name")
    if not isinstance(name, str) or not name:
        raise DatasetError(f"{where}: 'name' (the image file name) is missing or not a string")
    return name


def frame_labels(frame: dict[str, Any], where: str) -> list[Any]:
    labels = frame.get("labels")
    if labels is None:  # frames without objects: absent or null in the official files
        return []
    if not isinstance(labels, list):
        raise DatasetError(f"{where}: 'labels' must be a list, got {type(labels).__name__}")
    return labels


def box_corners(box: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(box, dict):
        raise DatasetError(f"{where}: 'box2d' must be an object with x1, y1, x2, y2")
    corners = []
    for key in ("x1", "y1", "x2", "y2"):
        value = box.get(key)
        if not is_number(value):
            raise DatasetError(f"{where}: box2d.{key} must be a finite number, got {value!r}")
        corners.append(value)
    return tuple(corners)  # type: ignore[return-value]


def is_number(value: Any) -> bool:
    # JSON true/false parse as bool, a subclass of int: not a coordinate.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_crowd(label: dict[str, Any], where: str) -> bool:
    attributes = label.get("attributes")
    if attributes is None:
        return False
    if not isinstance(attributes, dict):
        raise DatasetError(f"{where}: 'attributes' must be an object, got {type(attributes).__name__}")
    return bool(attributes.get("crowd", False))


def image_size(
    frame: dict[str, Any], name: str, images_dir: Path | None, where: str
) -> tuple[int, int] | None:
    """(width, height) of a frame's image, or None when its file is missing."""
    if images_dir is not None and not (images_dir / name).is_file():
        return None
    if frame.get("size") is not None:
        return declared_size(frame["size"], where)
    if images_dir is not None:
        return read_image_size(images_dir / name)
    return DEFAULT_WIDTH, DEFAULT_HEIGHT


def declared_size(size: Any, where: str) -> tuple[int, int]:
    if not isinstance(size, dict):
        raise DatasetError(f"{where}: 'size' must be an object with width and height")
    values = []
    for key in ("width", "height"):
        value = size.get(key)
        if not is_number(value) or value <= 0 or value != int(value):
            raise DatasetError(f"{where}: size.{key} must be a positive integer, got {value!r}")
        values.append(int(value))
    return values[0], values[1]


def read_image_size(path: Path) -> tuple[int, int]:
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
