"""Batching through the HF image processor: resize, normalise, pad, convert boxes."""

from __future__ import annotations

from typing import Any

import torch


def processor_size(shortest_edge: int, max_size_ratio: float) -> dict[str, int]:
    """The processor's size dict: shortest edge, with the longest edge capped by a ratio."""
    return {"shortest_edge": int(shortest_edge), "longest_edge": int(round(shortest_edge * max_size_ratio))}


class DetrCollator:
    """Turns dataset samples into model inputs. Runs inside DataLoader workers.

    The target size comes with the samples (see `SampleRequest`), never from state set
    on this object after the workers started.
    """

    def __init__(self, image_processor, max_size_ratio: float):
        self.image_processor = image_processor
        self.max_size_ratio = max_size_ratio

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        sizes = {s["size"] for s in samples}
        if len(sizes) != 1:
            raise ValueError(f"a batch must have one image size, got {sizes}")
        size = sizes.pop()
        # size None: augmentation already resized each image (multi-scale); only normalise and pad.
        resize = {"do_resize": False} if size is None else {"size": processor_size(size, self.max_size_ratio)}
        encoded = self.image_processor(
            images=[s["image"] for s in samples],
            annotations=[s["target"] for s in samples],
            return_tensors="pt",
            **resize,
        )
        return {
            "pixel_values": encoded["pixel_values"],
            "pixel_mask": encoded["pixel_mask"],
            "labels": [dict(label) for label in encoded["labels"]],
            "image_ids": [s["target"]["image_id"] for s in samples],
            "orig_sizes": torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64),
        }
