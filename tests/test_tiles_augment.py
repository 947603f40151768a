"""Training on native-resolution tiles (`data/augment=tiles`): the pixels are the original's,
boxes cut by the tile's border follow `min_visible`, tiles are placed over objects, and the
tile side is the training size."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from detr_train.config.checks import check_config
from detr_train.data.augment import Augmenter
from detr_train.errors import ConfigError
from tests.conftest import compose_config
from tests.test_augment import PRESETS, RATIO

CALL = {"seed": 3, "base_size": 800}


def tiles(**tile) -> Augmenter:
    settings = OmegaConf.to_container(OmegaConf.load(PRESETS / "tiles.yaml"))
    settings["tile"].update(tile)
    return Augmenter(settings, reference_size=800, max_size_ratio=RATIO)


def noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def expected_boxes(boxes_xywh, window, flip: bool, width: int, min_visible: float):
    """The boxes a tile should keep, in its pixels, worked out with plain arithmetic."""
    kept = []
    for label, (x, y, w, h) in enumerate(boxes_xywh):
        if flip:
            x = width - x - w
        x0, y0 = max(x, window.left), max(y, window.top)
        x1, y1 = min(x + w, window.left + window.width), min(y + h, window.top + window.height)
        visible = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        if visible >= min_visible * w * h and min(x1 - x0, y1 - y0) >= 1:
            kept.append((label, [x0 - window.left, y0 - window.top, x1 - x0, y1 - y0]))
    return kept


def test_the_tile_is_a_window_of_the_original_pixels_never_resized():
    augmenter = tiles(size=64)
    image = noise(200, 120)
    flips = 0
    for index in range(12):
        plan = augmenter.plan(120, 200, epoch=1, index=index, **CALL)
        out, _, _ = augmenter(image, [], [], epoch=1, index=index, **CALL)
        source = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if plan.flip else image
        window = plan.tile
        expected = source.crop((window.left, window.top, window.left + 64, window.top + 64))
        assert out.size == (64, 64) and np.array_equal(np.asarray(out), np.asarray(expected))
        flips += plan.flip
    assert 0 < flips < 12
    assert not augmenter.defers_resize and augmenter.tile_size == 64


def test_an_image_smaller_than_the_tile_is_taken_whole_on_its_short_sides():
    augmenter = tiles(size=100)
    image = noise(150, 60)
    for index in range(6):
        out, _, _ = augmenter(image, [], [], epoch=0, index=index, **CALL)
        assert out.size == (100, 60)
    out, boxes, _ = tiles(size=400)(image, [[5, 5, 10, 10]], [0], epoch=0, index=0, **CALL)
    assert out.size == (150, 60) and len(boxes) == 1


@pytest.mark.parametrize("min_visible", [0.5, 0.25, 1.0])
def test_boxes_inside_are_kept_and_cut_ones_follow_min_visible(min_visible):
    augmenter = tiles(size=64, min_visible=min_visible)
    width, height = 160, 120
    # Small boxes everywhere (2x2 upwards), so tiles cut many and hold many whole.
    boxes = [[float(x), float(y), float(2 + (x + y) % 13), float(2 + x % 7)]
             for x in range(3, 150, 17) for y in range(1, 110, 23)]
    seen = {"whole": 0, "cut kept": 0, "cut dropped": 0}
    for index in range(40):
        plan = augmenter.plan(height, width, epoch=2, index=index, boxes_xywh=boxes, **CALL)
        _, out_boxes, out_labels = augmenter(noise(width, height), boxes, list(range(len(boxes))), epoch=2,
                                             index=index, **CALL)
        expected = expected_boxes(boxes, plan.tile, plan.flip, width, min_visible)
        assert out_labels == [label for label, _ in expected]
        for got, (_, want) in zip(out_boxes, expected):
            assert got == pytest.approx(want, abs=1e-4)
        for label, (x, y, w, h) in enumerate(boxes):
            left = width - plan.tile.left - 64 if plan.flip else plan.tile.left
            inside = left <= x and x + w <= left + 64 and plan.tile.top <= y and y + h <= plan.tile.top + 64
            overlaps = x < left + 64 and left < x + w and y < plan.tile.top + 64 and plan.tile.top < y + h
            if inside:
                assert label in out_labels  # a whole box is never dropped, whatever min_visible says
                seen["whole"] += 1
            elif overlaps:
                seen["cut kept" if label in out_labels else "cut dropped"] += 1
    assert seen["whole"] > 100 and seen["cut dropped"] > 10
    assert (seen["cut kept"] > 10) == (min_visible < 1.0), seen


def test_tiles_are_placed_over_objects_as_often_as_asked():
    width, height = 1280, 720
    box = [900.0, 100.0, 6.0, 14.0]  # a traffic light far from the centre

    def containing(object_prob: float) -> int:
        augmenter = tiles(size=256, object_prob=object_prob)
        count = 0
        for index in range(200):
            plan = augmenter.plan(height, width, epoch=1, index=index, boxes_xywh=[box], **CALL)
            x = width - box[0] - box[2] if plan.flip else box[0]
            window = plan.tile
            count += (window.left <= x and x + box[2] <= window.left + 256
                      and window.top <= box[1] and box[1] + box[3] <= window.top + 256)
        return count

    assert containing(1.0) == 200
    # Placed uniformly, a tile holds the box with probability (256-6)(256-14) / ((1280-255)(720-255)) = 0.13.
    assert containing(0.0) < 45
    assert 90 < containing(0.5) < 140  # 0.5 + 0.5 x 0.13 of 200 = 113 (sd 7)


def test_tiles_are_a_pure_function_of_seed_epoch_and_index():
    boxes = [[10.0, 10.0, 20.0, 20.0], [150.0, 80.0, 8.0, 8.0]]
    first = [tiles(size=64).plan(120, 200, epoch=1, index=i, boxes_xywh=boxes, **CALL) for i in range(10)]
    again = [tiles(size=64).plan(120, 200, epoch=1, index=i, boxes_xywh=boxes, **CALL) for i in range(10)]
    later = [tiles(size=64).plan(120, 200, epoch=2, index=i, boxes_xywh=boxes, **CALL) for i in range(10)]
    assert first == again and first != later


def test_the_tile_side_is_the_training_size_of_every_batch(synthetic_root):
    from detr_train.data.build import build_data
    from detr_train.data.coco import SampleRequest
    from detr_train.data.collate import DetrCollator
    from detr_train.modeling.build import build_image_processor
    from tests.conftest import SMALL_SYNTHETIC

    cfg = compose_config(SMALL_SYNTHETIC + [f"data.root={synthetic_root}", "data/augment=tiles",
                                            "data.augment.tile.size=64"])
    check_config(cfg)
    data = build_data(cfg.data, cfg.training, cfg.budget)
    samples = [data.train[SampleRequest(index, cfg.data.image_size, 1)] for index in range(4)]
    assert all(s["size"] is None and s["image"].size == (64, 64) for s in samples)
    batch = DetrCollator(build_image_processor(96, RATIO), RATIO)(samples)
    assert tuple(batch["pixel_values"].shape[-2:]) == (64, 64)  # not resized to data.image_size (96)


@pytest.mark.parametrize("override,key", [
    (["data.augment.tile.size=0"], "data.augment.tile.size"),
    (["data.augment.tile.min_visible=0"], "data.augment.tile.min_visible"),
    (["data.augment.tile.min_visible=1.5"], "data.augment.tile.min_visible"),
    (["data.augment.tile.object_prob=2"], "data.augment.tile.object_prob"),
    (["data.augment.scales=[480,512]"], "data.augment.scales"),
    (["data.augment.crop.prob=0.5"], "data.augment.crop.prob"),
    (["training.resize_schedule=[[1,64],[3,96]]"], "training.resize_schedule"),
])
def test_settings_that_cannot_work_with_tiles_name_their_key(override, key):
    cfg = compose_config(["data/augment=tiles", "data.root=/some/where", *override])
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    assert str(raised.value).startswith(key)
