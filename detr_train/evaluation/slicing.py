"""Sliced inference (the SAHI approach): tiles of each image at native resolution plus the
whole image, their detections merged per class, for objects a few pixels wide.

    detr-train-eval run/ --slice 512 --slice-overlap 0.2      training.eval_slice=512

Geometry. `tile_grid` covers an image with `size` x `size` tiles whose starts step by
`size - round(overlap x size)`; the last tile of a row or column is moved back to end at
the image's edge (so it overlaps its neighbour more), and a side shorter than `size` is
one tile of that side. Tiles go to the model at native resolution: cut from the original
image and only normalised and padded, never resized, as `data/augment=tiles` trains.
The whole image goes through as evaluation always feeds it (resized to data.eval_size).

Batches. `SlicedCollator` cuts and preprocesses the tiles inside the DataLoader workers,
in chunks of the evaluation batch size, beside the usual whole-image batch; `with_tiles`
runs each chunk through the same model call as the whole images (autocast included) and
maps the tile boxes into image pixels.

Boxes at inner tile borders. An object cut by a tile's edge that another tile continues
(an inner edge) shows up truncated in that tile. Such tile detections (a box within
`INNER_EDGE_MARGIN` px of an inner edge) are dropped: an object no wider than the overlap
band minus the margin lies whole in the neighbouring tile, and a larger one is seen whole
in the whole image. Edges on the image's own border are not inner, so objects cut by the
image keep their tile detections.

Merging. DETR predicts a set, one box per object, so the detections of one view never need
non-maximum suppression: only the same object seen from two views must become one. The
merge is greedy in score order over all views' detections (the whole image's first on
equal scores): a detection is dropped when a kept one of the same class from another view
overlaps it by more than `iou_threshold` (IoU), and it stops at `top_k` kept detections
(COCOeval's 100 per image). torchvision's `batched_nms` would also suppress overlapping
detections of one view (two cars side by side in one DETR output), changing what an
unsliced model predicts; with this merge, one tile equal to the whole image gives exactly
the unsliced detections.

Why not the `sahi` library: its model wrappers run one image at a time (no batched tiles,
no AMP), and it pulls opencv, shapely, pybboxes and fire for what is a grid, a crop and a
merge here; its merges (NMS/NMM over all boxes) also suppress within a view, as above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

# Pixels from an inner tile edge within which a tile detection counts as cut by it.
INNER_EDGE_MARGIN = 2.0

# (pixel_values, pixel_mask, sizes (n, 2) as (height, width)) -> per image: scores, labels, boxes
# (xyxy in pixels of those sizes), as the image processor's post-processing returns them.
Detect = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class SliceSettings:
    """Tile side (pixels), the overlap of neighbouring tiles (fraction of the side), and the IoU
    above which detections from two views are one object."""

    size: int
    overlap: float = 0.2
    iou_threshold: float = 0.5

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.overlap < 1 or not 0 < self.iou_threshold <= 1:
            raise ValueError(f"bad slice settings: {self}")

    @classmethod
    def from_training(cls, train_cfg: Any) -> "SliceSettings | None":
        """`training.eval_slice*` as settings; None when eval_slice is null."""
        if train_cfg.eval_slice is None:
            return None
        return cls(int(train_cfg.eval_slice), float(train_cfg.eval_slice_overlap), float(train_cfg.eval_slice_iou))


@dataclass(frozen=True)
class Tile:
    """A window of an image, in its pixels."""

    top: int
    left: int
    height: int
    width: int


def _starts(side: int, size: int, step: int) -> list[int]:
    if side <= size:
        return [0]
    starts = list(range(0, side - size, step))
    if starts[-1] + size < side:
        starts.append(side - size)
    return starts


def tile_grid(height: int, width: int, size: int, overlap: float) -> list[Tile]:
    """The tiles that cover an image, row by row (see the module docstring)."""
    step = max(1, size - round(overlap * size))
    tile_h, tile_w = min(size, height), min(size, width)
    return [Tile(top, left, tile_h, tile_w)
            for top in _starts(height, size, step) for left in _starts(width, size, step)]


# --- in the DataLoader workers ---------------------------------------------------------------


class SlicedCollator:
    """What `collator` makes of the samples, plus `tile_chunks`: every readable image's tiles,
    preprocessed at native resolution, `chunk_size` tiles per model call."""

    def __init__(self, collator: Callable[[list[dict]], dict], image_processor, settings: SliceSettings,
                 chunk_size: int):
        self.collator = collator
        self.image_processor = image_processor
        self.settings = settings
        self.chunk_size = max(1, int(chunk_size))

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collator(samples)
        # The order of batch["image_ids"]: unreadable images (predict) carry no "image".
        images = [sample["image"] for sample in samples if "image" in sample]
        placed = [(owner, tile) for owner, image in enumerate(images)
                  for tile in tile_grid(image.height, image.width, self.settings.size, self.settings.overlap)]
        batch["tile_chunks"] = [self._chunk(images, placed[start:start + self.chunk_size])
                                for start in range(0, len(placed), self.chunk_size)]
        return batch

    def _chunk(self, images: list, placed: list[tuple[int, Tile]]) -> dict:
        crops = [images[owner].crop((t.left, t.top, t.left + t.width, t.top + t.height)) for owner, t in placed]
        encoded = self.image_processor(images=crops, do_resize=False, return_tensors="pt")
        return {"pixel_values": encoded["pixel_values"], "pixel_mask": encoded["pixel_mask"],
                "sizes": torch.tensor([(t.height, t.width) for _, t in placed], dtype=torch.int64),
                "owners": [owner for owner, _ in placed], "tiles": [t for _, t in placed]}


def sliced_collator(collator, image_processor, settings: SliceSettings | None, chunk_size: int):
    """`collator` itself without slicing, else wrapped to add the tiles."""
    return collator if settings is None else SlicedCollator(collator, image_processor, settings, chunk_size)


# --- on the model's device -------------------------------------------------------------------


def with_tiles(whole: list[dict[str, torch.Tensor]], batch: dict, detect: Detect, settings: SliceSettings,
               top_k: int = 100) -> list[dict[str, torch.Tensor]]:
    """The whole images' detections (`whole`, one per image of `batch`) merged with their tiles'."""
    views: list[list[dict[str, torch.Tensor]]] = [[result] for result in whole]
    image_sizes = batch["orig_sizes"].tolist()
    for chunk in batch["tile_chunks"]:
        results = detect(chunk["pixel_values"], chunk["pixel_mask"], chunk["sizes"])
        for owner, tile, result in zip(chunk["owners"], chunk["tiles"], results):
            views[owner].append(_in_image(result, tile, *image_sizes[owner]))
    return [merge_views(image_views, settings.iou_threshold, top_k) for image_views in views]


def _in_image(result: dict[str, torch.Tensor], tile: Tile, image_height: int, image_width: int) -> dict:
    """A tile's detections in image pixels, without those cut by an inner tile edge."""
    boxes = result["boxes"]
    x0, y0, x1, y1 = boxes.unbind(-1)
    cut = torch.zeros_like(x0, dtype=torch.bool)
    if tile.left > 0:
        cut |= x0 <= INNER_EDGE_MARGIN
    if tile.top > 0:
        cut |= y0 <= INNER_EDGE_MARGIN
    if tile.left + tile.width < image_width:
        cut |= x1 >= tile.width - INNER_EDGE_MARGIN
    if tile.top + tile.height < image_height:
        cut |= y1 >= tile.height - INNER_EDGE_MARGIN
    keep = ~cut
    offset = boxes.new_tensor([tile.left, tile.top, tile.left, tile.top])
    return {"scores": result["scores"][keep], "labels": result["labels"][keep], "boxes": boxes[keep] + offset}


def merge_views(views: list[dict[str, torch.Tensor]], iou_threshold: float, top_k: int = 100) -> dict:
    """One image's detections from several views (the whole image first), merged (see the module
    docstring): at most `top_k`, by descending score, on the CPU."""
    scores = torch.cat([v["scores"] for v in views]).float().cpu()
    labels = torch.cat([v["labels"] for v in views]).cpu()
    boxes = torch.cat([v["boxes"] for v in views]).float().cpu()
    view_of = torch.cat([torch.full((len(v["scores"]),), i) for i, v in enumerate(views)])
    # Stable: on equal scores the earlier view (the whole image) comes first and is the one kept.
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = _greedy_across_views(boxes[order].numpy(), labels[order].numpy(), view_of[order].numpy(),
                                iou_threshold, top_k)
    chosen = order[torch.from_numpy(kept)]
    return {"scores": scores[chosen], "labels": labels[chosen], "boxes": boxes[chosen]}


def _greedy_across_views(boxes: np.ndarray, labels: np.ndarray, views: np.ndarray, iou_threshold: float,
                         top_k: int) -> np.ndarray:
    """Ranks (into the score-sorted arrays) of the kept detections. The IoU is computed for each
    kept box against the rest only, not as a full matrix: at most top_k rows (~1 ms for 7 x 100)."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    suppressed = np.zeros(len(boxes), dtype=bool)
    kept: list[int] = []
    for rank in range(len(boxes)):
        if len(kept) == top_k:
            break
        if suppressed[rank]:
            continue
        kept.append(rank)
        width = np.clip(np.minimum(x1[rank], x1) - np.maximum(x0[rank], x0), 0, None)
        height = np.clip(np.minimum(y1[rank], y1) - np.maximum(y0[rank], y0), 0, None)
        overlap = width * height
        with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: nan, which compares False
            iou = overlap / (areas[rank] + areas - overlap)
        suppressed |= (iou > iou_threshold) & (labels == labels[rank]) & (views != views[rank])
    return np.asarray(kept, dtype=np.int64)
