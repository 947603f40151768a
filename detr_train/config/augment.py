"""Training augmentation settings (`data.augment`): a structured config, no torch.

The schema imports this module at CLI start-up, so it must stay light: no torch, no
torchvision, no PIL. The pipeline that reads these settings is `detr_train.data.augment`.

Sizes. Every pixel size below (`scales`, `max_size`, `crop.resize_scales`,
`crop.min_side`, `crop.max_side`) is written at a *reference* training shortest edge and
multiplied by `base_size / reference` for each epoch, where `base_size` is that epoch's
training shortest edge (`training.resize_schedule`, else `data.image_size`) and
`reference` is `reference_size` below, or `data.image_size` when that is null. So the
DETR recipe is written once, at 800, and a schedule entry of 640 scales it by 0.8.

Longest edge. `max_size` (scaled like the rest) caps the longest edge when set; when it
is null the cap is `data.max_size_ratio` x the chosen shortest edge, the same rule the
evaluation resize uses. `max_size` wins when both are available.

Tiles. With `tile.size` set, each training image is a random `size` x `size` window cut
from the image at its native resolution (nothing is resized before or after the cut), for
objects a few pixels wide that a downscale would erase. The tile's side is then the
epoch's training size: `data.image_size` and `training.resize_schedule` do not resize
training images (a schedule is refused with tiles, see `config.checks`). Tiles exclude
the multi-scale resize and the crop branch (`scales` null, `crop.prob` 0); flip and
jitter still apply. See `TileConfig`.

The defaults here are the `none` preset: no flip, no crop, no jitter, one scale (the
base size itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# typing.List / Optional, not `list[int]` / `X | None`: what OmegaConf's structured configs read.
from typing import Any, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detr_train.errors import ConfigError

KEY_PREFIX = "data.augment"


@dataclass
class CropConfig:
    """DETR's random-size crop branch: resize, crop a random window, then the multi-scale resize.

    Taken with probability `prob`. The window's height and width are each drawn
    uniformly (integers) in [min_side, min(max_side, image side)]; an image side already
    shorter than `min_side` is kept whole.
    """

    prob: float = 0.0
    # Shortest edges to resize to before cropping (no longest-edge cap, as in DETR).
    resize_scales: List[int] = field(default_factory=lambda: [400, 500, 600])
    min_side: int = 384
    max_side: int = 600


@dataclass
class JitterConfig:
    """Photometric jitter with torchvision ColorJitter's meaning of the strengths.

    With probability `prob` the image gets brightness, contrast and saturation factors
    drawn in [max(0, 1 - s), 1 + s] and a hue shift in [-hue, hue], applied in a random
    order. A strength of 0 leaves that property alone.
    """

    prob: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class TileConfig:
    """Training on native-resolution tiles (`data/augment=tiles`); `size` null: off.

    The window is `size` x `size`, or the whole side of an image shorter than that (no
    padding beyond the collator's batch padding, no upscaling). With probability
    `object_prob` it is placed over one of the image's boxes drawn uniformly (uniformly
    among the windows that contain that box whole, or centred on it when it is larger),
    so that tiles of sparse street scenes show objects rather than road; otherwise it is
    placed uniformly. A box cut by the window's border is kept, clipped, when at least
    `min_visible` of its area remains in the tile; a box wholly inside is always kept.
    """

    size: Optional[int] = None
    min_visible: float = 0.5
    object_prob: float = 0.5


@dataclass
class AugmentConfig:
    """`data.augment`: horizontal flip, multi-scale resize, optional crop branch, optional jitter."""

    hflip_prob: float = 0.0
    # Training shortest edges to choose from (uniformly). null: the base size alone.
    scales: Optional[List[int]] = None
    # Longest-edge cap; null: data.max_size_ratio x the chosen shortest edge.
    max_size: Optional[int] = None
    # The training shortest edge the pixel sizes here are written for; null: data.image_size.
    reference_size: Optional[int] = None
    crop: CropConfig = field(default_factory=CropConfig)
    jitter: JitterConfig = field(default_factory=JitterConfig)
    tile: TileConfig = field(default_factory=TileConfig)


# --- building from a config node ---------------------------------------------------------


def augment_config_from(node: Any) -> AugmentConfig:
    """An `AugmentConfig` from a dataclass, a mapping or an OmegaConf node, validated.

    OmegaConf merges the node into the structured defaults (the `none` preset), so keys
    missing from it keep their defaults, and an unknown key or a value of the wrong type
    is an error naming `data.augment.<key>`: a typo is not silently ignored.
    """
    if isinstance(node, AugmentConfig):
        settings = node
    elif node is None:
        settings = AugmentConfig()
    else:
        try:
            settings = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(AugmentConfig), node))
        except (OmegaConfBaseException, ValueError) as error:
            key = getattr(error, "full_key", None)
            reason = str(error).splitlines()[0]
            where = f"{KEY_PREFIX}.{key}" if key else KEY_PREFIX
            raise ConfigError(f"{where}: {reason}") from None
    validate_augment_config(settings)
    return settings


# --- validation ----------------------------------------------------------------------------


def validate_augment_config(settings: Any) -> None:
    """Raise `ConfigError` (a `ValueError`) naming `data.augment.<key>` for the first bad value.

    Takes the dataclass or anything with the same attributes (an OmegaConf node).
    """
    _probability(settings.hflip_prob, "hflip_prob")
    if settings.scales is not None:
        _size_list(settings.scales, "scales", null_hint=True)
    _optional_positive_int(settings.max_size, "max_size")
    _optional_positive_int(settings.reference_size, "reference_size")
    if settings.max_size is not None and settings.scales is not None and settings.max_size < max(settings.scales):
        raise ConfigError(
            f"{KEY_PREFIX}.max_size = {settings.max_size} is below the largest of {KEY_PREFIX}.scales "
            f"({max(settings.scales)}): that shortest edge could never be reached"
        )
    _validate_crop(settings.crop)
    _validate_jitter(settings.jitter)
    _validate_tile(settings)


def _validate_crop(crop: Any) -> None:
    _probability(crop.prob, "crop.prob")
    _size_list(crop.resize_scales, "crop.resize_scales", null_hint=False)
    _positive_int(crop.min_side, "crop.min_side")
    _positive_int(crop.max_side, "crop.max_side")
    if crop.min_side > crop.max_side:
        raise ConfigError(
            f"{KEY_PREFIX}.crop.min_side = {crop.min_side} is larger than {KEY_PREFIX}.crop.max_side = {crop.max_side}"
        )


def _validate_jitter(jitter: Any) -> None:
    _probability(jitter.prob, "jitter.prob")
    for name in ("brightness", "contrast", "saturation"):
        value = getattr(jitter, name)
        if not _is_number(value) or value < 0:
            raise ConfigError(f"{KEY_PREFIX}.jitter.{name} must be a number >= 0, got {value!r}")
    # A hue shift beyond half a turn wraps around: torchvision refuses it too.
    if not _is_number(jitter.hue) or not 0 <= jitter.hue <= 0.5:
        raise ConfigError(f"{KEY_PREFIX}.jitter.hue must be in [0, 0.5], got {jitter.hue!r}")


def _validate_tile(settings: Any) -> None:
    tile = settings.tile
    _optional_positive_int(tile.size, "tile.size")
    if not _is_number(tile.min_visible) or not 0.0 < tile.min_visible <= 1.0:
        raise ConfigError(f"{KEY_PREFIX}.tile.min_visible must be a fraction in (0, 1], got {tile.min_visible!r}")
    _probability(tile.object_prob, "tile.object_prob")
    if tile.size is None:
        return
    # A tile is cut at native resolution: a resize before (crop branch) or after (scales) it would undo that.
    if settings.scales is not None:
        raise ConfigError(f"{KEY_PREFIX}.scales must be null with {KEY_PREFIX}.tile.size (tiles are cut at native "
                          f"resolution, never resized), got {list(settings.scales)}")
    if settings.crop.prob > 0:
        raise ConfigError(f"{KEY_PREFIX}.crop.prob must be 0 with {KEY_PREFIX}.tile.size (the tile is the crop), "
                          f"got {settings.crop.prob!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _probability(value: Any, key: str) -> None:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{KEY_PREFIX}.{key} must be a probability in [0, 1], got {value!r}")


def _positive_int(value: Any, key: str) -> None:
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{KEY_PREFIX}.{key} must be a positive integer (pixels), got {value!r}")


def _optional_positive_int(value: Any, key: str) -> None:
    if value is not None:
        _positive_int(value, key)


def _size_list(values: Any, key: str, *, null_hint: bool) -> None:
    sizes = list(values) if hasattr(values, "__iter__") and not isinstance(values, (str, bytes)) else None
    if sizes is None:
        raise ConfigError(f"{KEY_PREFIX}.{key} must be a list of sizes in pixels, got {values!r}")
    if not sizes:
        hint = " (use null for the base size alone)" if null_hint else ""
        raise ConfigError(f"{KEY_PREFIX}.{key} is empty: list at least one size{hint}")
    for position, size in enumerate(sizes):
        if not _is_int(size) or size <= 0:
            raise ConfigError(f"{KEY_PREFIX}.{key}[{position}] must be a positive integer (pixels), got {size!r}")
