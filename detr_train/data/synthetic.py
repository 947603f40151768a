"""A small synthetic detection dataset: coloured shapes on varied backgrounds.

It lets `detr-train` run and visibly learn with no download. Generation is a pure
function of the `generate` settings (seed included): the images and COCO json are
written once into `data.root` together with a fingerprint of those settings, and
reused by later runs; changed settings regenerate the folder.

Images are square (`image_size`) or, with `image_size_range: [min, max]`, of a size
drawn per image: width and height each in [min, max], landscape like dashcam frames
(`data=synthetic_small`, a stand-in for BDD100K's small traffic lights). `class_weights`
makes some classes rarer than others, as BDD100K's riders and trains are. `small_shapes`
renders for objects of a few pixels: each shape is drawn at 4x and averaged down, so it
keeps its outline (partial coverage at the edges) instead of collapsing into a blob like
its neighbours, and its colour is kept far from the background under it (not only from
the image's base colour), so no tiny object vanishes into a stripe of similar colour.

The settings that existed first (square images, hard-edged shapes) draw exactly the
random numbers and pixels they always did, and the newer keys enter the fingerprint
only when they are used: datasets generated before them stay valid byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageStat

from detr_train.config.synthetic import SHAPES, check_generate_settings

log = logging.getLogger(__name__)

_FINGERPRINT_FILE = "generator.json"
_FORMAT_VERSION = 1


# Supersampling factor of `small_shapes` rendering: coverage in steps of 1/16 of a pixel.
_SUPERSAMPLE = 4


def _settings_dict(gen_cfg) -> dict:
    """The settings that define the dataset: its fingerprint, and what generation reads."""
    image_size = gen_cfg.image_size
    settings = {
        "version": _FORMAT_VERSION,
        "num_train": int(gen_cfg.num_train),
        "num_val": int(gen_cfg.num_val),
        "image_size": None if image_size is None else int(image_size),
        "classes": [str(c) for c in gen_cfg.classes],
        "max_objects": int(gen_cfg.max_objects),
        "min_object_size": int(gen_cfg.min_object_size),
        "max_object_size": int(gen_cfg.max_object_size),
        "seed": int(gen_cfg.seed),
    }
    # Later keys join the fingerprint only when set, so that older datasets keep theirs.
    # getattr: configs written before these keys existed do not have them.
    size_range = getattr(gen_cfg, "image_size_range", None)
    if size_range is not None:
        settings["image_size_range"] = [int(v) for v in size_range]
    if getattr(gen_cfg, "small_shapes", False):
        settings["small_shapes"] = True
    class_weights = getattr(gen_cfg, "class_weights", None)
    if class_weights is not None:
        settings["class_weights"] = [float(w) for w in class_weights]
    return settings


def _random_colour(rng: random.Random, avoid: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    # Keep objects clearly distinguishable from the background they sit on.
    while True:
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(colour, avoid)) > 200:
            return colour


def _contrasting_colour(rng: random.Random, avoid: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """A random colour far (sum of channel differences > 200) from every colour in `avoid`."""
    while True:
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        if all(sum(abs(a - b) for a, b in zip(colour, other)) > 200 for other in avoid):
            return colour


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """Plain, two-tone gradient or noisy background, so the model cannot rely on one look."""
    base = _random_colour(rng)
    image = Image.new("RGB", (width, height), base)
    style = rng.choice(("plain", "stripes", "noise"))
    draw = ImageDraw.Draw(image)
    if style == "stripes":
        other = _random_colour(rng)
        step = rng.randint(8, 24)
        for x in range(0, width, 2 * step):
            draw.rectangle([x, 0, x + step - 1, height], fill=tuple((a + b) // 2 for a, b in zip(base, other)))
    elif style == "noise":
        for _ in range(width * height // 40):
            x, y = rng.randrange(width), rng.randrange(height)
            draw.point((x, y), fill=_random_colour(rng))
        image = image.filter(ImageFilter.GaussianBlur(1))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=colour)
    elif shape == "cross":
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle([x0 + w, y0, x1 - w - 1, y1 - 1], fill=colour)
        draw.rectangle([x0, y0 + h, x1 - 1, y1 - h - 1], fill=colour)
    else:
        raise ValueError(f"unknown synthetic shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def shape_mask(shape: str, width: int, height: int) -> Image.Image:
    """An antialiased coverage mask ("L", 0-255) of `shape` filling a width x height box.

    Drawn at `_SUPERSAMPLE`x and box-averaged down, so each pixel holds the fraction of
    it the shape covers: a 4 px circle keeps soft corners, a triangle a thin apex, and
    every shape still reaches all four edges of its box (tight annotations).
    """
    mask = Image.new("L", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, (0, 0, width * _SUPERSAMPLE, height * _SUPERSAMPLE), 255)
    return mask.reduce(_SUPERSAMPLE)


def _overlaps(box, others, max_iou: float = 0.1) -> bool:
    for other in others:
        ix = max(0, min(box[2], other[2]) - max(box[0], other[0]))
        iy = max(0, min(box[3], other[3]) - max(box[1], other[1]))
        inter = ix * iy
        union = (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
        if inter / union > max_iou:
            return True
    return False


def _image_size(rng: random.Random, settings: dict) -> tuple[int, int]:
    """(width, height): square `image_size`, or drawn in `image_size_range`, landscape."""
    if settings.get("image_size_range") is None:
        # No draw here: square datasets keep the random sequence they were made with.
        return settings["image_size"], settings["image_size"]
    low, high = settings["image_size_range"]
    first, second = rng.randint(low, high), rng.randint(low, high)
    return max(first, second), min(first, second)


def _make_image(rng: random.Random, settings: dict) -> tuple[Image.Image, list[tuple[int, tuple[int, int, int, int]]]]:
    width, height = _image_size(rng, settings)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    background = image.getpixel((0, 0))
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(rng.randint(1, settings["max_objects"])):
        for _attempt in range(20):
            w = rng.randint(settings["min_object_size"], settings["max_object_size"])
            h = max(settings["min_object_size"], min(settings["max_object_size"], int(w * rng.uniform(0.7, 1.4))))
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            box = (x0, y0, x0 + w, y0 + h)
            if not _overlaps(box, [b for _, b in objects]):
                break
        else:
            continue
        weights = settings.get("class_weights")
        if weights is None:
            label = rng.randrange(len(settings["classes"]))
        else:
            label = rng.choices(range(len(settings["classes"])), weights=weights)[0]
        if settings.get("small_shapes"):
            local = tuple(round(v) for v in ImageStat.Stat(image.crop(box)).mean)
            colour = _contrasting_colour(rng, avoid=(background, local))
            image.paste(colour, box, shape_mask(settings["classes"][label], w, h))
        else:
            _draw_shape(draw, settings["classes"][label], box, _random_colour(rng, avoid=background))
        objects.append((label, box))
    return image, objects


def _write_split(root: Path, split: str, count: int, rng: random.Random, settings: dict) -> None:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, objects = _make_image(rng, settings)
        file_name = f"{split}_{index:05d}.png"
        image.save(image_dir / file_name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for label, (x0, y0, x1, y1) in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    # Category ids start at 1, as in COCO.
                    "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(settings["classes"])]
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def generate_synthetic_dataset(root: Path, gen_cfg) -> None:
    """Write train/val images and COCO json under `root`, deterministically from the settings."""
    settings = _settings_dict(gen_cfg)
    check_generate_settings(settings)
    # Generate into a sibling folder and swap it in, so an interrupted generation
    # never leaves a half-written dataset that looks complete.
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = random.Random(settings["seed"])
    _write_split(staging, "train", settings["num_train"], rng, settings)
    _write_split(staging, "val", settings["num_val"], rng, settings)
    (staging / _FINGERPRINT_FILE).write_text(json.dumps(settings, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)


def ensure_synthetic_dataset(data_cfg) -> Path:
    """Generate the dataset unless `data.root` already holds one made with the same settings."""
    root = Path(str(data_cfg.root)).expanduser()
    stored = root / _FINGERPRINT_FILE
    wanted = _settings_dict(data_cfg.generate)
    if stored.is_file():
        try:
            if json.loads(stored.read_text()) == wanted:
                return root
        except json.JSONDecodeError:
            pass
        log.info("Synthetic dataset settings changed; regenerating %s", root)
    log.info(
        "Generating synthetic dataset in %s (%d train / %d val images)", root, wanted["num_train"], wanted["num_val"]
    )
    generate_synthetic_dataset(root, data_cfg.generate)
    return root
