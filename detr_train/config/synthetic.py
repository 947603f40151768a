"""`data.generate`: what the synthetic dataset generator can draw, checked before it draws.

The generator (`detr_train.data.synthetic`) calls the same check, so settings built in code
are refused as clearly as a config.
"""

from __future__ import annotations

from typing import Any

from detr_train.errors import ConfigError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")


def check_generate_settings(settings: Any) -> None:
    """Raise ConfigError naming the `data.generate` key that cannot be generated. `settings`
    has the keys of `config.schema.GenerateConfig` (a node or a dict)."""
    get = settings.get if isinstance(settings, dict) else lambda key, default=None: getattr(settings, key, default)
    unknown = [c for c in get("classes") if c not in SHAPES]
    if unknown:
        raise ConfigError(f"data.generate.classes: unknown shape(s) {unknown}; known shapes: {list(SHAPES)}")
    weights = get("class_weights")
    if weights is not None and (len(weights) != len(get("classes")) or min(weights) < 0 or sum(weights) <= 0):
        raise ConfigError(
            f"data.generate.class_weights must give one weight >= 0 per class ({len(get('classes'))}) "
            f"with a positive sum, got {list(weights)}"
        )
    image_size, size_range = get("image_size"), get("image_size_range")
    if (image_size is None) == (size_range is None):
        raise ConfigError(
            "data.generate: set exactly one of image_size (square images) and image_size_range "
            f"([min, max] per image); got image_size={image_size}, image_size_range={size_range}"
        )
    if size_range is not None and not (len(size_range) == 2 and 0 < size_range[0] <= size_range[1]):
        raise ConfigError(f"data.generate.image_size_range must be [min, max] with 0 < min <= max, got {size_range}")
    smallest_side = image_size if size_range is None else size_range[0]
    low, high = get("min_object_size"), get("max_object_size")
    if not 0 < low <= high <= smallest_side:
        raise ConfigError(
            "data.generate: need 0 < min_object_size <= max_object_size <= the smallest image side "
            f"({smallest_side}); got min_object_size={low}, max_object_size={high}"
        )
