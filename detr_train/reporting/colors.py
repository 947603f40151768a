"""One fixed colour per class index, the same in every figure and every drawing of a run.

Hues stepped by the golden ratio stay far apart for any number of classes and depend on
the class index only, so the palette never changes between epochs or runs.
"""

from __future__ import annotations

import colorsys
import functools

Color = tuple[int, int, int]

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_FIRST_HUE = 0.07
# Alternating brightness separates neighbours whose hues land close after many steps.
_SATURATION_VALUE_CYCLE = ((0.85, 0.95), (0.75, 0.70), (0.60, 1.00))


@functools.lru_cache(maxsize=1024)
def class_color(label: int) -> Color:
    """The fixed RGB colour of class index `label` (saturated, never grey)."""
    hue = (_FIRST_HUE + label * _GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation, value = _SATURATION_VALUE_CYCLE[label % len(_SATURATION_VALUE_CYCLE)]
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def readable_text_color(background: Color) -> Color:
    """Black or white, whichever reads better on `background`."""
    # Perceived luminance (ITU-R BT.601): dark text on light labels, white on dark ones.
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)
