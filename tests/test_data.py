"""Synthetic generation, the COCO dataset's category mapping, subsets, and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from detr_train.data.augment import Augmenter
from detr_train.data.coco import CocoDetectionDataset, SampleRequest
from detr_train.data.sampling import EpochBatchSampler, select_training_images
from detr_train.data.sources import DatasetError
from detr_train.data.synthetic import ensure_synthetic_dataset
from tests.conftest import SMALL_SYNTHETIC, compose_config


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _synthetic_cfg(root: Path, *extra: str):
    return compose_config(SMALL_SYNTHETIC + [f"data.root={root}", "data.generate.num_train=6", "data.generate.num_val=3", *extra]).data


def test_synthetic_generation_is_deterministic_and_reused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    ensure_synthetic_dataset(_synthetic_cfg(first))
    ensure_synthetic_dataset(_synthetic_cfg(second))
    assert _digest(first) == _digest(second)
    data = json.loads((first / "annotations" / "train.json").read_text())
    assert len(data["images"]) == 6 and data["annotations"]
    # Generated once, then reused: the files are not rewritten.
    stamp = (first / "train" / "train_00000.png").stat().st_mtime_ns
    ensure_synthetic_dataset(_synthetic_cfg(first))
    assert (first / "train" / "train_00000.png").stat().st_mtime_ns == stamp


def test_synthetic_settings_change_regenerates(tmp_path):
    root = tmp_path / "data"
    ensure_synthetic_dataset(_synthetic_cfg(root))
    before = _digest(root)
    ensure_synthetic_dataset(_synthetic_cfg(root, "data.generate.seed=7"))
    assert _digest(root) != before


def _write_coco(root: Path, *, annotations=None, images=None, categories=None, make_images=True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [
        {"id": 10, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 20, "file_name": "b.png", "width": 64, "height": 48},
        {"id": 30, "file_name": "empty.png", "width": 64, "height": 48},
    ]
    if make_images:
        for image in images:
            Image.new("RGB", (image["width"], image["height"]), (90, 90, 90)).save(root / "images" / image["file_name"])
    data = {
        "images": images,
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 10, 12], "area": 120, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 17, "bbox": [20, 8, 30, 20], "area": 600, "iscrowd": 0},
            {"id": 3, "image_id": 20, "category_id": 90, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 4, "image_id": 20, "category_id": 3, "bbox": [30, 10, 20, 20], "area": 400, "iscrowd": 1},
        ],
        "categories": categories if categories is not None else [
            {"id": 90, "name": "zebra"}, {"id": 3, "name": "car"}, {"id": 17, "name": "cat"},
        ],
    }
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


def test_non_contiguous_categories_map_both_ways(tmp_path):
    ann = _write_coco(tmp_path)
    dataset = CocoDetectionDataset(tmp_path / "images", ann)
    cats = dataset.categories
    assert cats.category_ids == [3, 17, 90] and cats.names == ["car", "cat", "zebra"]
    assert [cats.label(c) for c in (3, 17, 90)] == [0, 1, 2]
    assert [cats.category_id(label) for label in (0, 1, 2)] == [3, 17, 90]
    sample = dataset[SampleRequest(0, 64, 1)]
    assert sorted(a["category_id"] for a in sample["target"]["annotations"]) == [0, 1]


def test_images_without_annotations_are_kept_and_crowd_is_not_a_target(tmp_path):
    dataset = CocoDetectionDataset(tmp_path / "images", _write_coco(tmp_path))
    assert len(dataset) == 3
    by_id = {dataset.image_ids[i]: dataset[i]["target"]["annotations"] for i in range(3)}
    assert by_id[30] == []
    # Image 20 has one normal box and one crowd box: only the normal one is a training target.
    assert [a["category_id"] for a in by_id[20]] == [2]


def _flipper(probability: float) -> Augmenter:
    return Augmenter({"hflip_prob": probability}, reference_size=64, max_size_ratio=1.667)


def test_hflip_is_reproducible_and_moves_boxes(tmp_path):
    dataset = CocoDetectionDataset(tmp_path / "images", _write_coco(tmp_path), augmenter=_flipper(1.0))
    sample = dataset[SampleRequest(0, 64, 1)]
    flipped = sample["target"]["annotations"]
    assert sorted(a["bbox"][0] for a in flipped) == [64 - 20 - 30, 64 - 4 - 10]
    assert sample["size"] == 64  # a flip alone leaves the resize to the image processor
    again = CocoDetectionDataset(tmp_path / "images", tmp_path / "ann.json", augmenter=_flipper(0.5), seed=3)

    def boxes(index: int, epoch: int) -> list:
        return [a["bbox"] for a in again[SampleRequest(index, 64, epoch)]["target"]["annotations"]]

    first = [boxes(i, e) for i in range(2) for e in range(4)]
    assert first == [boxes(i, e) for i in range(2) for e in range(4)]
    assert len({str(b) for b in first}) > 2  # both sides of the coin came up


def test_bad_boxes_are_dropped_with_one_counted_warning(tmp_path, caplog):
    ann = _write_coco(tmp_path, annotations=[
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [4, 4, 0, 12]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [4, 4, 10, -1]},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [100, 100, 10, 10]},
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [60, 40, 10, 10]},  # partly outside: clipped
    ])
    with caplog.at_level(logging.WARNING):
        dataset = CocoDetectionDataset(tmp_path / "images", ann)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "dropped 3 box(es)" in warnings[0] and "2 non-positive" in warnings[0] and "1 outside" in warnings[0]
    assert str(ann) in warnings[0]
    boxes = [a["bbox"] for a in dataset[0]["target"]["annotations"]]
    assert boxes == [[60.0, 40.0, 4.0, 8.0]]


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing_json", "annotation file not found"),
        ("malformed_json", "is not valid json"),
        ("not_coco", "missing or non-list COCO key"),
        ("unknown_category", "unknown category_id 5"),
        ("empty", "dataset is empty"),
        ("missing_image", "missing from"),
    ],
)
def test_bad_dataset_input_is_one_clear_error(tmp_path, case, match):
    ann = tmp_path / "ann.json"
    if case == "missing_json":
        pass
    elif case == "malformed_json":
        ann.write_text("{not json")
    elif case == "not_coco":
        ann.write_text(json.dumps({"images": []}))
    elif case == "unknown_category":
        _write_coco(tmp_path, annotations=[{"id": 1, "image_id": 10, "category_id": 5, "bbox": [1, 1, 2, 2]}])
    elif case == "empty":
        _write_coco(tmp_path, images=[], annotations=[])
    elif case == "missing_image":
        _write_coco(tmp_path, make_images=False)
        (tmp_path / "images").mkdir(exist_ok=True)
    with pytest.raises(DatasetError, match=match) as info:
        CocoDetectionDataset(tmp_path / "images", ann)
    assert "\n" not in str(info.value)
    assert str(ann) in str(info.value) or case == "missing_image"


def test_unreadable_image_names_the_file(tmp_path):
    ann = _write_coco(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"not an image")
    dataset = CocoDetectionDataset(tmp_path / "images", ann)
    with pytest.raises(DatasetError, match="cannot read image .*b.png"):
        dataset[1]


def test_subset_is_reproducible_from_its_seed():
    ids = list(range(100))
    a = select_training_images(ids, subset_size=10, subset_seed=1, overfit=False, overfit_size=10)
    b = select_training_images(ids, subset_size=10, subset_seed=1, overfit=False, overfit_size=10)
    c = select_training_images(ids, subset_size=10, subset_seed=2, overfit=False, overfit_size=10)
    assert a == b and a != c and len(set(a)) == 10


def test_overfit_takes_the_first_images():
    assert select_training_images(list(range(5, 50)), subset_size=None, subset_seed=0, overfit=True, overfit_size=3) == [5, 6, 7]


def test_subset_larger_than_dataset_is_a_clear_error():
    with pytest.raises(DatasetError, match="training.subset_size=200 is larger than the training set .*100 images"):
        select_training_images(list(range(100)), subset_size=200, subset_seed=0, overfit=False, overfit_size=10)


def test_sampler_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    sampler = EpochBatchSampler(10, 3, shuffle=True, seed=5, size_for_epoch=lambda e: 100 + e)
    sampler.set_epoch(2)
    full = list(sampler)
    assert all(r.size == 102 and r.epoch == 2 for batch in full for r in batch)
    assert sorted(r.index for batch in full for r in batch) == list(range(10))
    sampler.set_epoch(2, start_batch=2)
    assert list(sampler) == full[2:] and len(sampler) == len(full) - 2
    sampler.set_epoch(3)
    assert [r.index for b in sampler for r in b] != [r.index for b in full for r in b]
    unshuffled = EpochBatchSampler(5, 2, shuffle=False, seed=5, size_for_epoch=lambda e: 64)
    assert [[r.index for r in b] for b in unshuffled] == [[0, 1], [2, 3], [4]]
