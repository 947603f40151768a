"""The training augmentation pipeline: flip, multi-scale resize, DETR's crop branch, jitter.

Settings come from `data.augment` (see `detr_train.config.augment`, which also explains how pixel
sizes scale with the epoch's training size). An `Augmenter` turns one decoded image and
its boxes into the final training image: the collator then only normalises and pads.

Determinism. Resuming must replay exactly the augmentations an uninterrupted run would
have drawn, in any DataLoader worker. So every random choice is drawn from a private
`random.Random` seeded by the string "(seed)-(epoch)-(index)[-purpose]" (seeding from a
string hashes it with SHA-512: stable across processes and Python versions, and
independent of PYTHONHASHSEED), never from torch's or Python's global RNG, which is why
torchvision's random v2 transforms are not used. Each decision (flip, crop, final scale,
jitter) has its own stream, so changing one setting does not reshuffle the others; the
flip's stream is the bare "(seed)-(epoch)-(index)" string and its first draw is the coin
`CocoDetectionDataset` used before this module existed, so flips stay what they were.

Tiles (`tile.size`, see `detr_train.config.augment.TileConfig`). The plan's `tile` is a
window of the (flipped) image at its native resolution; its placement needs the boxes, so
`plan` takes them. A box the window cuts is kept, clipped, when at least `min_visible` of
its area remains; one wholly inside always is. Nothing is resized: the tile is the final
image.

Geometry. The drawn parameters are applied with the deterministic functional ops of
`torchvision.transforms.v2.functional` to the image and to a `tv_tensors.BoundingBoxes`
together, so box arithmetic is the library's. Boxes are clamped to the image, and those
of which less than 1 px of the *source* image is left (cut away by a crop, or a sliver at
its edge) are dropped together with their labels. The measure is the source image's
pixels, not the returned one's: a downscaling resize keeps every small box it shrinks (a
2x2 px traffic light at scale 0.4 is a 0.8 px target, not a deleted label).

Image type. PIL in, PIL out. The torchvision ops dispatch to PIL's own kernels, which
on CPU are as fast as the uint8 tensor kernels for the geometry (PIL resizes slower,
flips and crops faster) and 10-200x faster for the photometric ops (at 640x480: hue
3 ms against 540 ms). The collator's `DeformableDetrImageProcessor` takes the PIL image
exactly as it did before augmentation moved here (with do_resize=False).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision import tv_tensors

from detr_train.config.augment import AugmentConfig, augment_config_from

log = logging.getLogger(__name__)

# The order jitter ops are drawn from; the applied order is a random permutation of it.
_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
_JITTER_FUNCTIONS = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "saturation": F.adjust_saturation,
    "hue": F.adjust_hue,
}
# Boxes with less than this left of them, in pixels of the source image, are dropped.
MIN_BOX_SIDE = 1.0
# float32 box arithmetic may put a side of exactly MIN_BOX_SIDE an ulp below it.
_SIDE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CropWindow:
    """A crop in the pixels of the image it is taken from."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class AugmentPlan:
    """Everything random about one sample's augmentation, drawn before any pixel is touched.

    Sizes are (height, width). `crop_resize` and `crop` are both set (crop branch) or
    both None. `tile` (native-resolution tiles) excludes both and `final_size`. `jitter`
    lists (op, factor) in the order they are applied.
    """

    flip: bool
    crop_resize: tuple[int, int] | None
    crop: CropWindow | None
    final_size: tuple[int, int] | None  # None: the image keeps its size (see Augmenter.defers_resize)
    jitter: tuple[tuple[str, float], ...]
    tile: CropWindow | None = None


def resized_size(height: int, width: int, shortest: int, longest_cap: int | None) -> tuple[int, int]:
    """(h, w) with the shortest edge at `shortest`, shrunk further if the longest edge would pass the cap."""
    scale = shortest / min(height, width)
    if longest_cap is not None and max(height, width) * scale > longest_cap:
        scale = longest_cap / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _stream(seed: int, epoch: int, index: int, purpose: str | None = None) -> random.Random:
    key = f"{seed}-{epoch}-{index}" if purpose is None else f"{seed}-{epoch}-{index}-{purpose}"
    return random.Random(key)


def _flipped(box_xywh: Sequence[float], width: int) -> list[float]:
    x, y, w, h = (float(v) for v in box_xywh)
    return [width - x - w, y, w, h]


def _start_covering(rng: random.Random, low: float, high: float, window: int, side: int) -> int:
    """A window start on one axis, uniform among those whose window holds [low, high] whole (a
    span longer than the window: the window centred on it), kept inside [0, side]."""
    first = max(0, math.ceil(high) - window)
    last = min(side - window, math.floor(low))
    if first > last:
        return min(max(0, round((low + high - window) / 2)), side - window)
    return rng.randint(first, last)


def _draw_side(rng: random.Random, side: int, min_side: int, max_side: int) -> int:
    # DETR's RandomSizeCrop: uniform in [min_side, min(max_side, side)]; a side already
    # shorter than min_side is kept whole instead of failing.
    low = min(min_side, side)
    high = max(low, min(max_side, side))
    return rng.randint(low, high)


class Augmenter:
    """Applies `data.augment` to one training sample; see the module docstring.

    `reference_size` (data.image_size) is the size the config's pixel sizes are written at
    unless the config names its own `reference_size`; `max_size_ratio`
    (data.max_size_ratio) caps the longest edge when the config's `max_size` is null.
    """

    def __init__(self, settings: AugmentConfig | Any, *, reference_size: int, max_size_ratio: float):
        self.settings = augment_config_from(settings)
        if reference_size <= 0:
            raise ValueError(f"reference_size must be positive, got {reference_size}")
        if max_size_ratio < 1:
            raise ValueError(f"max_size_ratio must be >= 1, got {max_size_ratio}")
        self.reference_size = self.settings.reference_size or int(reference_size)
        self.max_size_ratio = float(max_size_ratio)
        log.debug("Augmenter: %s at reference size %d", self.settings, self.reference_size)

    @property
    def defers_resize(self) -> bool:
        """No multi-scale, no crop and no tiles: the image keeps its size and the collator's image
        processor resizes it to the base size, exactly as evaluation images are resized."""
        return self.settings.scales is None and self.settings.crop.prob == 0 and self.tile_size is None

    @property
    def tile_size(self) -> int | None:
        """The side of native-resolution training tiles, which is then the training size; None: no tiles."""
        return self.settings.tile.size

    # --- sizes at this epoch's base size -------------------------------------------------

    def _scaler(self, base_size: int) -> Callable[[float], int]:
        # Config pixel sizes -> pixels at this epoch's base size.
        factor = base_size / self.reference_size
        return lambda pixels: max(1, round(pixels * factor))

    def scales_for(self, base_size: int) -> list[int]:
        """The shortest edges the final resize chooses from when training at `base_size`."""
        if self.settings.scales is None:
            return [int(base_size)]
        scaled = self._scaler(base_size)
        return [scaled(s) for s in self.settings.scales]

    def longest_cap(self, base_size: int, shortest: int) -> int:
        """The longest-edge cap for a final shortest edge: scaled `max_size`, else ratio x shortest."""
        if self.settings.max_size is not None:
            return self._scaler(base_size)(self.settings.max_size)
        # The same rounding as the evaluation processor's size (collate.processor_size).
        return round(shortest * self.max_size_ratio)

    # --- drawing ---------------------------------------------------------------------------

    def plan(self, height: int, width: int, *, seed: int, epoch: int, index: int, base_size: int,
             boxes_xywh: Sequence[Sequence[float]] = ()) -> AugmentPlan:
        """Draw every random choice for one sample: a pure function of its arguments.

        `boxes_xywh` (pixels of the unflipped image) only steer where a tile is placed.
        """
        settings = self.settings
        scaled = self._scaler(base_size)
        flip = _stream(seed, epoch, index).random() < settings.hflip_prob
        jitter = self._draw_jitter(_stream(seed, epoch, index, "jitter"))
        if self.tile_size is not None:
            boxes = [_flipped(box, width) for box in boxes_xywh] if flip else boxes_xywh
            tile = self._draw_tile(_stream(seed, epoch, index, "tile"), height, width, boxes)
            return AugmentPlan(flip, None, None, None, jitter, tile)

        crop_resize, crop = None, None
        crop_rng = _stream(seed, epoch, index, "crop")
        if crop_rng.random() < settings.crop.prob:
            pre_shortest = crop_rng.choice([scaled(s) for s in settings.crop.resize_scales])
            crop_resize = resized_size(height, width, pre_shortest, None)
            height, width = crop_resize
            crop_h = _draw_side(crop_rng, height, scaled(settings.crop.min_side), scaled(settings.crop.max_side))
            crop_w = _draw_side(crop_rng, width, scaled(settings.crop.min_side), scaled(settings.crop.max_side))
            crop = CropWindow(crop_rng.randint(0, height - crop_h), crop_rng.randint(0, width - crop_w), crop_h, crop_w)
            height, width = crop_h, crop_w

        final_size = None
        if not self.defers_resize:
            shortest = _stream(seed, epoch, index, "scale").choice(self.scales_for(base_size))
            final_size = resized_size(height, width, shortest, self.longest_cap(base_size, shortest))
        return AugmentPlan(flip, crop_resize, crop, final_size, jitter)

    def _draw_tile(self, rng: random.Random, height: int, width: int,
                   boxes_xywh: Sequence[Sequence[float]]) -> CropWindow:
        tile_h, tile_w = min(self.tile_size, height), min(self.tile_size, width)
        # Both draws are made whatever the outcome, so one sample's choice never shifts the next draw.
        over_object = rng.random() < self.settings.tile.object_prob
        pick = rng.randrange(len(boxes_xywh)) if boxes_xywh else None
        if over_object and pick is not None:
            x, y, w, h = (float(v) for v in boxes_xywh[pick])
            top = _start_covering(rng, y, y + h, tile_h, height)
            left = _start_covering(rng, x, x + w, tile_w, width)
        else:
            top, left = rng.randint(0, height - tile_h), rng.randint(0, width - tile_w)
        return CropWindow(top, left, tile_h, tile_w)

    def _draw_jitter(self, rng: random.Random) -> tuple[tuple[str, float], ...]:
        jitter = self.settings.jitter
        if not rng.random() < jitter.prob:
            return ()
        factors: dict[str, float] = {}
        for name in ("brightness", "contrast", "saturation"):
            strength = getattr(jitter, name)
            if strength > 0:
                factors[name] = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        if jitter.hue > 0:
            factors["hue"] = rng.uniform(-jitter.hue, jitter.hue)
        order = rng.sample(_JITTER_OPS, len(_JITTER_OPS))
        return tuple((name, factors[name]) for name in order if name in factors)

    # --- applying --------------------------------------------------------------------------

    def __call__(
        self,
        image: Image.Image,
        boxes_xywh: Sequence[Sequence[float]],
        labels: Sequence[int],
        *,
        seed: int,
        epoch: int,
        index: int,
        base_size: int,
    ) -> tuple[Image.Image, list[list[float]], list[int]]:
        """The final training image (RGB PIL) and its boxes (absolute xywh pixels of it) and labels.

        `boxes_xywh` are absolute pixels of `image`, one per entry of `labels`. Boxes
        cut away by a crop (less than MIN_BOX_SIDE source pixels left) come back dropped,
        with their labels. When `defers_resize`, the
        image keeps its size (the processor resizes it to `base_size`).
        """
        if len(boxes_xywh) != len(labels):
            raise ValueError(f"{len(boxes_xywh)} boxes but {len(labels)} labels")
        image = image if image.mode == "RGB" else image.convert("RGB")
        plan = self.plan(image.height, image.width, seed=seed, epoch=epoch, index=index, base_size=base_size,
                         boxes_xywh=boxes_xywh)
        scale_y, scale_x = output_pixels_per_source_pixel(plan, image.height, image.width)
        boxes = _to_bounding_boxes(boxes_xywh, (image.height, image.width))
        visible = None if plan.tile is None else self._visible_in_tile(plan, boxes, image.width)
        image, boxes = apply_plan(plan, image, boxes)
        xywh = F.convert_bounding_box_format(F.clamp_bounding_boxes(boxes),
                                             new_format=tv_tensors.BoundingBoxFormat.XYWH).as_subclass(torch.Tensor)
        keep = ((xywh[:, 2] / scale_x >= MIN_BOX_SIDE - _SIDE_TOLERANCE)
                & (xywh[:, 3] / scale_y >= MIN_BOX_SIDE - _SIDE_TOLERANCE))
        if visible is not None:
            keep &= visible
        kept_labels = [int(label) for label, kept in zip(labels, keep.tolist()) if kept]
        return image, xywh[keep].tolist(), kept_labels

    def _visible_in_tile(self, plan: AugmentPlan, boxes_xyxy: torch.Tensor, width: int) -> torch.Tensor:
        """Which boxes keep at least `tile.min_visible` of their area in the tile.

        Measured in the unaugmented image's pixels, against the window flipped back: clamping
        is exact there, so a box wholly inside compares equal to itself and is always kept.
        """
        tile = plan.tile
        left = width - tile.left - tile.width if plan.flip else tile.left
        clipped = boxes_xyxy.as_subclass(torch.Tensor).clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(left, left + tile.width)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(tile.top, tile.top + tile.height)
        return _areas(clipped) >= self.settings.tile.min_visible * _areas(boxes_xyxy.as_subclass(torch.Tensor))


def output_pixels_per_source_pixel(plan: AugmentPlan, height: int, width: int) -> tuple[float, float]:
    """(y, x) pixels of the returned image per pixel of the (height, width) source image."""
    scale_y = scale_x = 1.0
    if plan.crop is not None:
        scale_y, scale_x = plan.crop_resize[0] / height, plan.crop_resize[1] / width
        height, width = plan.crop.height, plan.crop.width
    if plan.final_size is not None:
        scale_y, scale_x = scale_y * plan.final_size[0] / height, scale_x * plan.final_size[1] / width
    return scale_y, scale_x


def _to_bounding_boxes(boxes_xywh: Sequence[Sequence[float]], canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    # Float boxes: integer ones would be rounded by every op. XYXY is what clamp and
    # sanitize work in, so no conversion happens between the ops.
    data = torch.tensor([list(map(float, b)) for b in boxes_xywh], dtype=torch.float32).reshape(-1, 4)
    xyxy = F.convert_bounding_box_format(data, old_format="XYWH", new_format="XYXY")
    return tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=canvas_size)


def _areas(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])


def apply_plan(
    plan: AugmentPlan, image: Image.Image, boxes: tv_tensors.BoundingBoxes
) -> tuple[Image.Image, tv_tensors.BoundingBoxes]:
    """Apply a drawn plan to an image and its boxes with torchvision's functional ops."""
    if plan.flip:
        image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
    if plan.crop is not None:
        image, boxes = F.resize(image, list(plan.crop_resize)), F.resize(boxes, list(plan.crop_resize))
        window = plan.crop
        image = F.crop(image, window.top, window.left, window.height, window.width)
        # Clamp right away: the boxes' edges are the crop's now, whatever the next resize does.
        boxes = F.clamp_bounding_boxes(F.crop(boxes, window.top, window.left, window.height, window.width))
    if plan.tile is not None:
        tile = plan.tile
        image = F.crop(image, tile.top, tile.left, tile.height, tile.width)
        boxes = F.crop(boxes, tile.top, tile.left, tile.height, tile.width)
    if plan.final_size is not None:
        image, boxes = F.resize(image, list(plan.final_size)), F.resize(boxes, list(plan.final_size))
    # Photometric ops are per pixel: cheapest on the final, usually smaller, image.
    for name, factor in plan.jitter:
        image = _JITTER_FUNCTIONS[name](image, factor)
    return image, boxes
