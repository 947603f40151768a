"""Boxes on images: detections and ground truth drawn by `torchvision.utils.draw_bounding_boxes`,
one fixed colour per class index (`colors.class_color`), saved as JPEG or PNG atomically."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_convert
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from detr_train.checkpointing.atomic import atomic_write
from detr_train.reporting.colors import Color, class_color, readable_text_color

JPEG_QUALITY = 90


def _pil_format(path: Path) -> str:
    extension = path.suffix.lower()
    image_format = Image.registered_extensions().get(extension)
    if image_format is None:
        raise ValueError(f"Cannot tell the image format from {path.name!r}: use .png or .jpg")
    return image_format


def save_image(image: torch.Tensor, path: Path) -> Path:
    """Write a uint8 CxHxW tensor as an image (format from the suffix: .png, .jpg, ...), atomically."""
    path = Path(path)
    image_format = _pil_format(path)
    pil_image = to_pil_image(_checked_uint8_image(image))
    options: dict[str, Any] = {"quality": JPEG_QUALITY} if image_format == "JPEG" else {}
    return atomic_write(path, lambda handle: pil_image.save(handle, format=image_format, **options))



# Filled label backgrounds arrived in later torchvision releases than the oldest we allow.
_FILLED_LABELS = "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


@functools.lru_cache(maxsize=1)
def _label_font() -> str | None:
    """Matplotlib's bundled DejaVu Sans: a scalable font that is there wherever matplotlib is."""
    candidate = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return str(candidate) if candidate.is_file() else None


def _checked_uint8_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        described = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected a uint8 image tensor of shape 3xHxW (or 1xHxW), got {described}")
    return image.cpu()


def _as_rgb_tensor(image: torch.Tensor | Image.Image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return pil_to_tensor(image.convert("RGB"))
    image = _checked_uint8_image(image)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _as_tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).to("cpu", dtype)


def _label_text(label: int, score: float | None, class_names: Sequence[str]) -> str:
    name = class_names[label] if 0 <= label < len(class_names) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def xywh_to_xyxy(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """COCO boxes [x, y, w, h] as an (N, 4) tensor of corners [x0, y0, x1, y1]."""
    xywh = torch.tensor([list(box) for box in boxes], dtype=torch.float32).reshape(-1, 4)
    return box_convert(xywh, "xywh", "xyxy")


def coco_detections_drawable(detections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """COCO-style detections whose category_id is the model's class index, as `draw_detections`
    (and `compare_with_ground_truth`'s `predicted`) take them."""
    return {"boxes": xywh_to_xyxy([d["bbox"] for d in detections]), "labels": [d["category_id"] for d in detections],
            "scores": [d["score"] for d in detections]}


def draw_detections(image: torch.Tensor | Image.Image, boxes_xyxy: Any, labels: Any, scores: Any | None,
                    class_names: Sequence[str], *, score_threshold: float = 0.3,
                    colors: Sequence[Color] | None = None, line_width: int | None = None) -> torch.Tensor:
    """A uint8 3xHxW copy of `image` with labelled boxes, drawn by torchvision.

    boxes_xyxy: (N, 4) absolute pixel corners; labels: (N,) class indices into
    `class_names`; scores: (N,) or None for ground truth (label text is then just the
    name, and every box is drawn). With scores, boxes under `score_threshold` are left
    out and the text reads "name 0.87". Boxes with NaN/inf corners are left out; boxes
    past the border are clamped to it. `colors` maps class index to RGB (default: the
    fixed `class_color` palette). The input image is never modified.
    """
    canvas = _as_rgb_tensor(image)
    boxes = _as_tensor(boxes_xyxy, torch.float32).reshape(-1, 4)
    label_list = [int(label) for label in _as_tensor(labels, torch.int64).reshape(-1).tolist()]
    score_list = None if scores is None else _as_tensor(scores, torch.float32).reshape(-1).tolist()
    if len(label_list) != len(boxes) or (score_list is not None and len(score_list) != len(boxes)):
        raise ValueError(f"{len(boxes)} boxes, {len(label_list)} labels, "
                         f"{'no' if score_list is None else len(score_list)} scores: the counts must match")
    finite = torch.isfinite(boxes).all(dim=1).tolist()  # a diverged model can predict NaN boxes
    keep = [i for i in range(len(boxes)) if finite[i] and (score_list is None or score_list[i] >= score_threshold)]
    if not keep:
        return canvas.clone()  # draw_bounding_boxes would warn, and hand back the same tensor
    height, width = canvas.shape[1:]
    # Clamped so that a box reaching past the border still shows its edge there.
    kept_boxes = boxes[keep].clone()
    kept_boxes[:, 0::2] = kept_boxes[:, 0::2].clamp(0, width - 1)
    kept_boxes[:, 1::2] = kept_boxes[:, 1::2].clamp(0, height - 1)
    kept_labels = [label_list[i] for i in keep]
    box_colors = [colors[label] if colors is not None and 0 <= label < len(colors) else class_color(label)
                  for label in kept_labels]
    texts = [_label_text(label_list[i], None if score_list is None else score_list[i], class_names) for i in keep]
    short_side = min(height, width)
    options: dict[str, Any] = {"width": line_width or max(2, round(short_side / 250))}
    font = _label_font()
    if font is not None:
        options.update(font=font, font_size=max(10, round(short_side / 45)))
    if _FILLED_LABELS:
        options.update(fill_labels=True, label_colors=[readable_text_color(c) for c in box_colors])
    return draw_bounding_boxes(canvas, kept_boxes, labels=texts, colors=box_colors, **options)


def side_by_side(left: torch.Tensor, right: torch.Tensor, *, gap: int = 4, gap_value: int = 255,
                 pad_value: int = 0) -> torch.Tensor:
    """`left | right` as one uint8 3xHxW image (e.g. prediction | ground truth).

    The shorter image is padded at the bottom with `pad_value`; a `gap`-pixel strip of
    `gap_value` separates the two.
    """
    left, right = _as_rgb_tensor(left), _as_rgb_tensor(right)
    height = max(left.shape[1], right.shape[1])
    total_width = left.shape[2] + gap + right.shape[2]
    canvas = torch.full((3, height, total_width), pad_value, dtype=torch.uint8)
    canvas[:, :, left.shape[2]:left.shape[2] + gap] = gap_value
    canvas[:, :left.shape[1], :left.shape[2]] = left
    canvas[:, :right.shape[1], left.shape[2] + gap:] = right
    return canvas


def compare_with_ground_truth(image: torch.Tensor | Image.Image, predicted: Mapping[str, Any],
                              ground_truth: Mapping[str, Any], class_names: Sequence[str], *,
                              score_threshold: float = 0.3) -> torch.Tensor:
    """Predictions | ground truth on the same image, as one uint8 tensor.

    `predicted` has "boxes" (xyxy pixels), "labels" and "scores"; `ground_truth` has
    "boxes" and "labels".
    """
    prediction_view = draw_detections(image, predicted["boxes"], predicted["labels"], predicted["scores"],
                                      class_names, score_threshold=score_threshold)
    truth_view = draw_detections(image, ground_truth["boxes"], ground_truth["labels"], None, class_names)
    return side_by_side(prediction_view, truth_view)
