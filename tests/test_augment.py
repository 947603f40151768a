"""The augmentation pipeline: deterministic draws, boxes that follow the pixels, sizes that
follow the epoch's base size, and settings validation naming `data.augment.<key>`."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from detr_train.config.augment import (
    AugmentConfig,
    augment_config_from,
    validate_augment_config,
)
from detr_train.data.augment import Augmenter

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "data" / "augment"
RATIO = 1.667
MARK = (255, 0, 255)  # the drawn rectangle's colour: nothing else in the test images is close to it
MARK_BOX = [30.0, 40.0, 80.0, 60.0]  # xywh, near the top-left corner so crops often cut it away


def preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))


def detr_augmenter(**overrides) -> Augmenter:
    settings = preset("detr")
    settings.update(overrides)
    return Augmenter(settings, reference_size=800, max_size_ratio=RATIO)


def scene(width: int = 640, height: int = 480) -> tuple[Image.Image, list[list[float]], list[int]]:
    """Grey image with the marked rectangle (label 7) and a second, blue one (label 3)."""
    image = Image.new("RGB", (width, height), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    x, y, w, h = MARK_BOX
    draw.rectangle([x, y, x + w - 1, y + h - 1], fill=MARK)
    draw.rectangle([300, 200, 419, 289], fill=(0, 0, 255))
    return image, [list(MARK_BOX), [300.0, 200.0, 120.0, 90.0]], [7, 3]


def pixels_of(image: Image.Image) -> torch.Tensor:
    return F.pil_to_tensor(image)


def hw(image: Image.Image) -> tuple[int, int]:
    return image.height, image.width


def marked_region(image: Image.Image) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) pixel edges of the pixels close to MARK, or None when there are none."""
    close = np.abs(np.asarray(image, dtype=np.int16) - np.array(MARK, dtype=np.int16)).sum(axis=2) < 60
    if not close.any():
        return None
    ys, xs = np.nonzero(close)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --- determinism -------------------------------------------------------------------------


def test_same_sample_gives_identical_output_even_from_a_fresh_instance():
    image, boxes, labels = scene()
    jitter = {"prob": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}
    first = detr_augmenter(jitter=jitter)
    for index in range(6):
        call = {"seed": 3, "epoch": 2, "index": index, "base_size": 400}
        a, b = first(image, boxes, labels, **call), first(image, boxes, labels, **call)
        c = detr_augmenter(jitter=jitter)(image, boxes, labels, **call)
        assert torch.equal(pixels_of(a[0]), pixels_of(b[0])) and torch.equal(pixels_of(a[0]), pixels_of(c[0]))
        assert a[1:] == b[1:] == c[1:]


def test_global_rngs_are_neither_used_nor_disturbed():
    image, boxes, labels = scene()
    augmenter = detr_augmenter(jitter={"prob": 1.0, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1})
    torch.manual_seed(0)
    random.seed(0)
    reference = augmenter(image, boxes, labels, seed=0, epoch=1, index=5, base_size=320)
    expected_torch, expected_python = torch.rand(1), random.random()
    torch.manual_seed(123)
    random.seed(123)
    again = augmenter(image, boxes, labels, seed=0, epoch=1, index=5, base_size=320)
    assert torch.equal(pixels_of(reference[0]), pixels_of(again[0])) and reference[1:] == again[1:]
    torch.manual_seed(0)
    random.seed(0)
    augmenter(image, boxes, labels, seed=0, epoch=1, index=5, base_size=320)
    assert torch.equal(torch.rand(1), expected_torch) and random.random() == expected_python


def test_choices_vary_with_index_and_epoch():
    augmenter = detr_augmenter()
    plans = [augmenter.plan(480, 640, seed=0, epoch=1, index=i, base_size=800) for i in range(400)]
    plain = [p for p in plans if p.crop is None]
    assert len({min(p.final_size) for p in plain[:50]}) > 1
    crop_rate = sum(p.crop is not None for p in plans) / len(plans)
    assert 0.4 < crop_rate < 0.6  # configured 0.5
    flip_rate = sum(p.flip for p in plans) / len(plans)
    assert 0.4 < flip_rate < 0.6
    next_epoch = [augmenter.plan(480, 640, seed=0, epoch=2, index=i, base_size=800) for i in range(50)]
    assert sum(a != b for a, b in zip(plans[:50], next_epoch)) > 40
    other_seed = [augmenter.plan(480, 640, seed=1, epoch=1, index=i, base_size=800) for i in range(50)]
    assert sum(a != b for a, b in zip(plans[:50], other_seed)) > 40


def test_flip_coin_is_the_one_the_dataset_used_before():
    # Flips drawn before this pipeline existed stay the same for the same (seed, epoch, index).
    augmenter = detr_augmenter()
    for index in range(50):
        legacy = random.Random(f"4-3-{index}").random() < 0.5
        assert augmenter.plan(480, 640, seed=4, epoch=3, index=index, base_size=800).flip == legacy


def test_changing_jitter_does_not_reshuffle_the_geometry():
    plain, jittered = detr_augmenter(), detr_augmenter(jitter={"prob": 0.8, "brightness": 0.2, "contrast": 0.0,
                                                               "saturation": 0.0, "hue": 0.0})
    for index in range(30):
        a = plain.plan(480, 640, seed=0, epoch=1, index=index, base_size=800)
        b = jittered.plan(480, 640, seed=0, epoch=1, index=index, base_size=800)
        assert (a.flip, a.crop, a.final_size) == (b.flip, b.crop, b.final_size)


# --- geometry ----------------------------------------------------------------------------


def test_boxes_follow_the_pixels_and_cut_away_boxes_are_dropped():
    augmenter = detr_augmenter()
    image, boxes, labels = scene()
    seen = {"dropped": 0, "flipped": 0, "cropped": 0}
    for epoch in range(2):
        for index in range(60):
            call = {"seed": 0, "epoch": epoch, "index": index, "base_size": 400}
            plan = augmenter.plan(image.height, image.width, **call)
            pixels, out_boxes, out_labels = augmenter(image, boxes, labels, **call)
            assert isinstance(pixels, Image.Image) and pixels.mode == "RGB" and hw(pixels) == plan.final_size
            assert len(out_boxes) == len(out_labels)
            region = marked_region(pixels)
            if 7 not in out_labels:
                seen["dropped"] += 1
                assert region is None, f"{call}: rectangle still visible at {region} but its box was dropped"
                continue
            seen["flipped"] += plan.flip
            seen["cropped"] += plan.crop is not None
            x, y, w, h = out_boxes[out_labels.index(7)]
            if min(w, h) < 4:  # a sliver left by a crop: too thin to see reliably after resizing
                continue
            assert region is not None, f"{call}: box {out_boxes} kept but the rectangle is gone"
            assert region == pytest.approx((x, y, x + w, y + h), abs=2), call
    assert seen["dropped"] > 0 and seen["flipped"] > 5 and seen["cropped"] > 5, seen


def test_no_boxes_and_box_order_are_handled():
    augmenter = detr_augmenter()
    image, _, _ = scene()
    pixels, out_boxes, out_labels = augmenter(image, [], [], seed=0, epoch=0, index=1, base_size=400)
    assert isinstance(pixels, Image.Image) and out_boxes == [] and out_labels == []
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        augmenter(image, [[0, 0, 5, 5], [1, 1, 5, 5]], [0], seed=0, epoch=0, index=1, base_size=400)


# --- composition with the base size --------------------------------------------------------


@pytest.mark.parametrize("width,height", [(640, 480), (1280, 720), (500, 900)])
def test_detr_sizes_scale_with_the_base_size(width, height):
    augmenter = detr_augmenter()
    image, boxes, labels = scene(width, height)
    scaled = [round(s * 0.8) for s in range(480, 801, 32)]
    cap = round(1333 * 0.8)
    assert augmenter.scales_for(640) == scaled
    for index in range(12):
        pixels, _, _ = augmenter(image, boxes, labels, seed=1, epoch=1, index=index, base_size=640)
        short, long = min(hw(pixels)), max(hw(pixels))
        assert long <= cap
        assert short in scaled or long == cap
    for index in range(100):
        plan = augmenter.plan(height, width, seed=1, epoch=1, index=index, base_size=640)
        if plan.crop is not None:
            assert min(plan.crop_resize) in (320, 400, 480)
            for side, image_side in ((plan.crop.height, plan.crop_resize[0]), (plan.crop.width, plan.crop_resize[1])):
                assert min(307, image_side) <= side <= min(480, image_side)


def test_at_the_reference_size_the_recipe_is_the_published_numbers():
    augmenter = detr_augmenter()
    assert augmenter.scales_for(800) == list(range(480, 801, 32))
    assert augmenter.longest_cap(800, 480) == 1333


def test_preset_reference_size_wins_over_the_callers():
    # The detr preset is written at 800: on a dataset trained at 160 it scales by 0.2.
    augmenter = Augmenter(preset("detr"), reference_size=160, max_size_ratio=RATIO)
    assert augmenter.scales_for(160) == [round(s * 0.2) for s in range(480, 801, 32)]
    written_at_caller = dict(preset("detr"), reference_size=None)
    assert Augmenter(written_at_caller, reference_size=160, max_size_ratio=RATIO).scales_for(160)[0] == 480


@pytest.mark.parametrize("width,height", [(640, 480), (1000, 720), (333, 517)])
def test_none_leaves_the_resize_to_the_processor(width, height):
    """Without multi-scale or crop the image keeps its size: the collator's image processor
    resizes it to the base size exactly as it resizes evaluation images."""
    augmenter = Augmenter(preset("none"), reference_size=800, max_size_ratio=RATIO)
    assert augmenter.defers_resize
    image, boxes, labels = scene(width, height)
    for index in range(5):
        pixels, out_boxes, out_labels = augmenter(image, boxes, labels, seed=0, epoch=index, index=index, base_size=640)
        assert hw(pixels) == (height, width)
        assert out_labels == labels and out_boxes[0] == pytest.approx(list(MARK_BOX), abs=1e-4)


def test_a_single_scale_caps_long_images_by_the_ratio():
    augmenter = Augmenter({"scales": [800]}, reference_size=800, max_size_ratio=RATIO)
    image, boxes, labels = scene(1000, 300)
    pixels, _, _ = augmenter(image, boxes, labels, seed=0, epoch=0, index=0, base_size=200)
    assert max(hw(pixels)) == round(200 * RATIO) and min(hw(pixels)) < 200


def test_max_size_wins_over_the_ratio():
    augmenter = Augmenter({"scales": [800], "max_size": 1000}, reference_size=800, max_size_ratio=RATIO)
    assert augmenter.longest_cap(800, 800) == 1000
    assert augmenter.longest_cap(400, 400) == 500


# --- settings ------------------------------------------------------------------------------


def test_presets_build_and_type_check_as_structured_configs():
    for name in ("detr", "none"):
        merged = OmegaConf.merge(OmegaConf.structured(AugmentConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))
        validate_augment_config(merged)
        assert augment_config_from(merged) == OmegaConf.to_object(merged)
    assert augment_config_from(preset("none")) == AugmentConfig()  # the dataclass defaults are `none`
    detr = augment_config_from(preset("detr"))
    assert detr.scales == list(range(480, 801, 32)) and detr.max_size == 1333 and detr.hflip_prob == 0.5
    assert (detr.crop.prob, detr.crop.resize_scales, detr.crop.min_side, detr.crop.max_side) == (0.5, [400, 500, 600], 384, 600)
    assert detr.jitter.prob == 0.0


@pytest.mark.parametrize(
    "override,key",
    [
        ({"hflip_prob": 1.5}, "data.augment.hflip_prob"),
        ({"hflip_prob": -0.1}, "data.augment.hflip_prob"),
        ({"scales": []}, "data.augment.scales"),
        ({"scales": [480, 0]}, "data.augment.scales[1]"),
        ({"scales": [480, -32]}, "data.augment.scales[1]"),
        ({"max_size": 0}, "data.augment.max_size"),
        ({"max_size": 700}, "data.augment.max_size"),  # below the largest scale (800)
        ({"reference_size": -800}, "data.augment.reference_size"),
        ({"crop": {"prob": 2.0}}, "data.augment.crop.prob"),
        ({"crop": {"resize_scales": []}}, "data.augment.crop.resize_scales"),
        ({"crop": {"min_side": 0}}, "data.augment.crop.min_side"),
        ({"crop": {"max_side": -1}}, "data.augment.crop.max_side"),
        ({"crop": {"min_side": 700, "max_side": 600}}, "data.augment.crop.min_side"),
        ({"jitter": {"prob": -1.0}}, "data.augment.jitter.prob"),
        ({"jitter": {"brightness": -0.1}}, "data.augment.jitter.brightness"),
        ({"jitter": {"saturation": -2}}, "data.augment.jitter.saturation"),
        ({"jitter": {"hue": 0.6}}, "data.augment.jitter.hue"),
        ({"flip": 0.5}, "data.augment.flip"),  # unknown key: a typo is not ignored
        ({"crop": {"size": 3}}, "data.augment.crop.size"),
    ],
)
def test_bad_values_raise_naming_the_key(override, key):
    settings = OmegaConf.merge(OmegaConf.create(preset("detr")), OmegaConf.create(override))
    with pytest.raises(ValueError) as raised:
        Augmenter(OmegaConf.to_container(settings), reference_size=800, max_size_ratio=RATIO)
    assert key in str(raised.value)


def test_config_module_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, detr_train.config.augment; sys.exit('torch' in sys.modules or 'PIL' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
