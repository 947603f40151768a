"""The small-object synthetic preset (`data=synthetic_small`): per-image sizes, 4-16 px
shapes rendered recognisably with tight boxes, deterministic generation, and the square
default dataset left exactly as it was."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from detr_train.data.synthetic import (
    SHAPES,
    _settings_dict,
    generate_synthetic_dataset,
    shape_mask,
)

CONF = Path(__file__).resolve().parent.parent / "conf" / "data"
SMALL_AREA = 32**2  # COCO's "small" objects


def small_generate(**overrides):
    """The preset's generate settings, with fewer images so the test stays fast."""
    gen = OmegaConf.load(CONF / "synthetic_small.yaml").generate
    gen.num_train, gen.num_val = 10, 4
    for key, value in overrides.items():
        gen[key] = value
    return gen


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "data"
    generate_synthetic_dataset(root, small_generate())
    return root


def test_preset_describes_small_objects_on_varied_landscape_images():
    data = OmegaConf.load(CONF / "synthetic_small.yaml")
    assert data.name == "synthetic" and data.root != OmegaConf.load(CONF / "synthetic.yaml").root
    assert set(data) == set(OmegaConf.load(CONF / "synthetic.yaml"))  # same keys as data=synthetic
    gen = data.generate
    assert (gen.min_object_size, gen.max_object_size, list(gen.image_size_range)) == (4, 16, [320, 640])
    assert gen.image_size is None and gen.small_shapes and gen.max_objects >= 8


def test_generation_is_deterministic(small_dataset, tmp_path):
    again = tmp_path / "again"
    generate_synthetic_dataset(again, small_generate())
    assert file_hashes(again) == file_hashes(small_dataset)
    other_seed = tmp_path / "other"
    generate_synthetic_dataset(other_seed, small_generate(seed=1))
    assert file_hashes(other_seed)["annotations/train.json"] != file_hashes(small_dataset)["annotations/train.json"]


def test_images_objects_and_boxes(small_dataset):
    sizes, count = set(), 0
    for split in ("train", "val"):
        data = json.loads((small_dataset / "annotations" / f"{split}.json").read_text())
        images = {img["id"]: img for img in data["images"]}
        for img in images.values():
            assert 320 <= img["height"] <= img["width"] <= 640
            sizes.add((img["width"], img["height"]))
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            img = images[ann["image_id"]]
            assert 4 <= w <= 16 and 4 <= h <= 16
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
            assert ann["area"] == w * h < SMALL_AREA
            count += 1
    assert len(sizes) > 5  # sizes vary per image
    assert count > 3 * 14  # several objects per image on average


def test_objects_are_painted_where_their_boxes_are(small_dataset):
    # Each object's colour was chosen far from the background under it: the box's
    # most-covered pixel differs clearly from the box's median background ring.
    from PIL import Image

    data = json.loads((small_dataset / "annotations" / "train.json").read_text())
    names = {img["id"]: img["file_name"] for img in data["images"]}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        pixels = np.asarray(Image.open(small_dataset / "train" / names[ann["image_id"]]).convert("RGB"), dtype=np.int32)
        inside = pixels[y + h // 2, x + w // 2]  # every shape covers its box centre
        ring = np.concatenate([pixels[max(y - 1, 0), x : x + w], pixels[min(y + h, pixels.shape[0] - 1), x : x + w]])
        assert np.abs(inside - np.median(ring, axis=0)).sum() > 60, ann


@pytest.mark.parametrize("shape", SHAPES)
def test_tiny_shapes_are_tight_and_keep_their_geometry(shape):
    # Coverage the exact shape would have: the mask must be that shape, not a blob.
    expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}[shape]
    for w in range(4, 17):
        for h in range(4, 17):
            mask = shape_mask(shape, w, h)
            assert mask.getbbox() == (0, 0, w, h), (shape, w, h)  # touches all four box edges
            coverage = np.asarray(mask, dtype=np.float64).sum() / 255 / (w * h)
            assert coverage == pytest.approx(expected, abs=0.05), (shape, w, h)


def test_tiny_shapes_differ_from_each_other():
    for size in (4, 6, 8):
        masks = {shape: np.asarray(shape_mask(shape, size, size)).tobytes() for shape in SHAPES}
        assert len(set(masks.values())) == len(SHAPES), size


def test_default_dataset_fingerprint_is_unchanged():
    # The square default must keep the fingerprint it always had: caches stay valid.
    gen = OmegaConf.load(CONF / "synthetic.yaml").generate
    assert _settings_dict(gen) == {
        "version": 1,
        "num_train": 800,
        "num_val": 100,
        "image_size": 160,
        "classes": ["circle", "square", "triangle"],
        "max_objects": 4,
        "min_object_size": 20,
        "max_object_size": 60,
        "seed": 0,
    }


def content_digest(root: Path) -> str:
    """A digest of the json files and the decoded pixels (not the PNG bytes, which a new zlib may change)."""
    from PIL import Image

    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(Image.open(path).tobytes() if path.suffix == ".png" else path.read_bytes())
    return digest.hexdigest()


# Made by the generator as it was before per-image sizes and `small_shapes` existed.
SQUARE_DIGEST = "69d7837f9ac37ca68b7e2a906f454d19b2eae1072639ec1fecf68fe61400e372"


def test_square_generation_is_unchanged(tmp_path):
    gen = OmegaConf.create(
        {"num_train": 3, "num_val": 2, "image_size": 64, "classes": ["circle", "square", "triangle"],
         "max_objects": 4, "min_object_size": 10, "max_object_size": 30, "seed": 5}
    )
    generate_synthetic_dataset(tmp_path / "square", gen)
    assert content_digest(tmp_path / "square") == SQUARE_DIGEST


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"image_size": 480}, "exactly one of image_size"),
        ({"image_size_range": None}, "exactly one of image_size"),
        ({"image_size_range": [640, 320]}, "image_size_range"),
        ({"max_object_size": 400}, "max_object_size"),
        ({"class_weights": [1.0, 1.0]}, "class_weights"),
        ({"class_weights": [1.0, -1.0, 1.0]}, "class_weights"),
    ],
)
def test_bad_generate_settings_raise(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(tmp_path / "bad", small_generate(**overrides))


def test_class_weights_make_a_class_rare(tmp_path):
    """Objects are drawn per class in proportion to `class_weights`; a weight of 0 never draws."""
    gen = small_generate(classes=["circle", "square", "cross"], class_weights=[1.0, 0.0, 0.25])
    gen.num_train, gen.num_val = 60, 0
    generate_synthetic_dataset(tmp_path / "rare", gen)
    labels = [ann["category_id"] for ann in json.loads((tmp_path / "rare/annotations/train.json").read_text())["annotations"]]
    circles, squares, crosses = (labels.count(i) for i in (1, 2, 3))
    assert squares == 0 and len(labels) > 200
    # Binomial(n, 0.2): the share of crosses lies within 4 standard deviations of 1/5.
    share, sd = crosses / len(labels), math.sqrt(0.2 * 0.8 / len(labels))
    assert abs(share - 0.2) < 4 * sd


def test_rare_preset_composes_and_its_rare_class_is_rare():
    data = OmegaConf.load(CONF / "synthetic_small_rare.yaml")
    gen = data.generate
    assert set(data) == set(OmegaConf.load(CONF / "synthetic.yaml"))
    weights = dict(zip(gen.classes, gen.class_weights))
    assert weights["cross"] * 10 < min(w for c, w in weights.items() if c != "cross")
    assert gen.max_object_size ** 2 < SMALL_AREA  # every box COCO-"small"
