"""Repeat-factor sampling (LVIS, Gupta et al. 2019; detectron2's `RepeatFactorTrainingSampler`).

For each class c, f(c) is the fraction of training images that contain c, and
r(c) = max(1, sqrt(t / f(c))) for the threshold t (`data.repeat_threshold`). An image's
factor is the largest r(c) among its classes (1 for an image without boxes). Each epoch
shows an image floor(r) times, plus once more with probability frac(r) (stochastic
rounding), so on average r times.

The rounding draws come from a generator the caller seeds from (seed, epoch): an epoch's
list is a pure function of them, which keeps a resumed run (even one resumed mid-epoch)
on the samples an uninterrupted one would see.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RepeatFactors:
    """The factors of one training set: per image (in dataset order) and per class (label)."""

    per_image: tuple[float, ...]
    per_class: dict[int, float]  # r(c), for every class present in the training images
    image_fraction: dict[int, float]  # f(c)
    threshold: float

    @property
    def expected_epoch_length(self) -> int:
        return expected_length(self.per_image)

    def most_repeated(self, count: int = 5) -> list[tuple[int, float]]:
        """(label, r) of the classes repeated most, most first; classes with r = 1 left out."""
        repeated = [(label, r) for label, r in self.per_class.items() if r > 1.0]
        return sorted(repeated, key=lambda item: (-item[1], item[0]))[:count]


def expected_length(factors: Sequence[float]) -> int:
    """Samples in an epoch on average: the sum of the factors, rounded."""
    return round(math.fsum(factors))


def repeat_factors(image_classes: Sequence[Collection[int]], threshold: float) -> RepeatFactors:
    """The factors for images holding `image_classes[i]` (labels; repeats within an image count once)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"data.repeat_threshold must be in (0, 1], got {threshold}")
    num_images = len(image_classes)
    images_with: dict[int, int] = {}
    for classes in image_classes:
        for label in set(classes):
            images_with[label] = images_with.get(label, 0) + 1
    fraction = {label: count / num_images for label, count in sorted(images_with.items())}
    per_class = {label: max(1.0, math.sqrt(threshold / f)) for label, f in fraction.items()}
    per_image = tuple(max((per_class[label] for label in classes), default=1.0) for classes in image_classes)
    return RepeatFactors(per_image, per_class, fraction, threshold)


def repeated_indices(factors: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """Dataset indices, each i repeated floor(r_i) times plus once more with probability frac(r_i), in order."""
    r = torch.tensor(factors, dtype=torch.float64)
    whole = torch.floor(r)
    extra = torch.rand(len(r), generator=generator, dtype=torch.float64) < (r - whole)
    counts = whole.to(torch.int64) + extra.to(torch.int64)
    return torch.repeat_interleave(torch.arange(len(r)), counts)
