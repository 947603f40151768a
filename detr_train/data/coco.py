"""A COCO-format detection dataset with contiguous labels.

COCO category ids may be sparse (1..90 with gaps); the model wants labels 0..K-1.
The dataset owns that mapping both ways so predictions can be scored against the
original json. Crowd annotations are kept out of the training targets (they are
ignore regions for COCOeval, not objects to learn). Bad boxes are dropped with one
counted warning per file; structural problems (missing file, malformed json,
unknown category, missing image) raise a `DatasetError` naming the culprit.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from detr_train.data.augment import Augmenter
from detr_train.data.sources import DatasetError

log = logging.getLogger(__name__)


class SampleRequest(NamedTuple):
    """What the batch sampler asks a worker for: which image, at which size, in which epoch.

    Carrying the size in the request (instead of an attribute on the dataset) is what
    lets progressive resizing reach persistent DataLoader workers.
    """

    index: int
    size: int
    epoch: int


def load_coco_json(ann_file: Path) -> dict[str, Any]:
    """Read and structurally check a COCO detection json, naming the file on any problem."""
    if not ann_file.is_file():
        raise DatasetError(f"annotation file not found: {ann_file}")
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"annotation file {ann_file} is not valid json: {exc}") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {ann_file}: expected a COCO json object, got {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DatasetError(f"annotation file {ann_file}: missing or non-list COCO key(s) {missing}")
    return data


class CategoryMap:
    """COCO category ids <-> contiguous model labels (sorted by category id)."""

    def __init__(self, categories: Sequence[dict]):
        ordered = sorted(categories, key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in ordered]
        self.names = [str(c.get("name", c["id"])) for c in ordered]
        self._label_of = {cat_id: label for label, cat_id in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.category_ids)

    def label(self, category_id: int) -> int:
        return self._label_of[int(category_id)]

    def category_id(self, label: int) -> int:
        return self.category_ids[int(label)]

    def __contains__(self, category_id: int) -> bool:
        return int(category_id) in self._label_of


class LoadCounts(NamedTuple):
    """What loading an annotation file did to its boxes (the data health report shows it)."""

    dropped: dict[str, int]  # why -> boxes
    clipped: int  # boxes that reached past the image and were cut to it


def _clean_annotations(data: dict, ann_file: Path, categories: CategoryMap) -> tuple[dict[int, list[dict]], LoadCounts]:
    """Group annotations per image; clip boxes to the image and drop degenerate ones."""
    images = {int(img["id"]): img for img in data["images"]}
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    dropped: Counter[str] = Counter()
    clipped = 0
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        if ann.get("category_id") not in categories:
            raise DatasetError(
                f"annotation file {ann_file}: annotation {ann_id} has unknown category_id "
                f"{ann.get('category_id')!r}; known ids: {categories.category_ids}"
            )
        image = images.get(int(ann.get("image_id", -1)))
        if image is None:
            raise DatasetError(f"annotation file {ann_file}: annotation {ann_id} refers to unknown image_id {ann.get('image_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise DatasetError(f"annotation file {ann_file}: annotation {ann_id} has malformed bbox {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            dropped["non-positive width or height"] += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(image["width"])), min(y + h, float(image["height"]))
        if x1 <= x0 or y1 <= y0:
            dropped["outside the image"] += 1
            continue
        clipped += (x0, y0, x1, y1) != (x, y, x + w, y + h)
        cleaned = dict(ann, bbox=[x0, y0, x1 - x0, y1 - y0])
        cleaned.setdefault("area", (x1 - x0) * (y1 - y0))
        cleaned.setdefault("iscrowd", 0)
        per_image[image["id"]].append(cleaned)
    if dropped:
        log.warning(
            "%s: dropped %d box(es): %s",
            ann_file,
            sum(dropped.values()),
            ", ".join(f"{n} {why}" for why, n in dropped.items()),
        )
    return per_image, LoadCounts(dict(dropped), clipped)


class CocoDetectionDataset(Dataset):
    """Images + targets from a COCO json, in the format the HF image processor expects.

    `image_ids` restricts the dataset to a subset (in that order). An `augmenter`
    (`data.augment`) draws every random choice from (seed, epoch, index), so a resumed
    run sees exactly the augmentations an uninterrupted one would.
    """

    def __init__(
        self,
        images_dir: Path,
        ann_file: Path,
        *,
        image_ids: Sequence[int] | None = None,
        augmenter: Augmenter | None = None,
        seed: int = 0,
        default_size: int = 800,
    ):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        data = load_coco_json(self.ann_file)
        if not data["categories"]:
            raise DatasetError(f"annotation file {self.ann_file} defines no categories")
        self.categories = CategoryMap(data["categories"])
        self._images = {int(img["id"]): img for img in data["images"]}
        self._annotations, self.load_counts = _clean_annotations(data, self.ann_file, self.categories)
        all_ids = sorted(self._images)
        if image_ids is not None:
            unknown = sorted(set(image_ids) - set(self._images))
            if unknown:
                raise DatasetError(f"{self.ann_file}: requested image ids not in the file: {unknown[:10]}")
            all_ids = list(image_ids)
        if not all_ids:
            raise DatasetError(f"dataset is empty: {self.ann_file} lists no images")
        self.image_ids = all_ids
        self._check_image_files()
        self.augmenter = augmenter
        self.seed = seed
        self.default_size = default_size

    def _check_image_files(self) -> None:
        if not self.images_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.images_dir} (listed by {self.ann_file})")
        missing = [
            self._images[i]["file_name"] for i in self.image_ids if not (self.images_dir / self._images[i]["file_name"]).is_file()
        ]
        if missing:
            raise DatasetError(
                f"{len(missing)} image file(s) listed in {self.ann_file} are missing from {self.images_dir}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict:
        return self._images[self.image_ids[index]]

    def annotations_of(self, index: int) -> list[dict]:
        """Image `index`'s annotations as loaded: boxes clipped to the image, crowd regions included."""
        return self._annotations[self.image_ids[index]]

    def labels_of(self, index: int) -> list[int]:
        """The labels of image `index`'s training boxes (crowd regions are not targets), one per box."""
        return [self.categories.label(ann["category_id"]) for ann in self.annotations_of(index)
                if not ann.get("iscrowd", 0)]

    def subset(self, image_ids: Sequence[int]) -> "CocoDetectionDataset":
        """The same dataset restricted to `image_ids` (no re-reading of the json)."""
        clone = object.__new__(CocoDetectionDataset)
        clone.__dict__.update(self.__dict__)
        clone.image_ids = list(image_ids)
        return clone

    def _load_image(self, info: dict) -> Image.Image:
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc

    def __getitem__(self, request: SampleRequest | int) -> dict:
        if isinstance(request, int):
            request = SampleRequest(request, self.default_size, 0)
        image_id = self.image_ids[request.index]
        info = self._images[image_id]
        image = self._load_image(info)
        orig_size = (image.height, image.width)
        annotations = [
            {
                "bbox": list(ann["bbox"]),
                "category_id": self.categories.label(ann["category_id"]),
                "area": float(ann["area"]),
                "iscrowd": 0,
            }
            for ann in self._annotations[image_id]
            if not ann.get("iscrowd", 0)
        ]
        size: int | None = request.size
        if self.augmenter is not None:
            image, annotations = self._augment(image, annotations, request)
            if not self.augmenter.defers_resize:
                size = None  # already at its final size: the collator only normalises and pads
        return {
            "image": image,
            "target": {"image_id": image_id, "annotations": annotations},
            "size": size,
            "orig_size": orig_size,
        }

    def _augment(self, image: Image.Image, annotations: list[dict], request: SampleRequest):
        image, boxes, labels = self.augmenter(
            image, [a["bbox"] for a in annotations], [a["category_id"] for a in annotations],
            seed=self.seed, epoch=request.epoch, index=request.index, base_size=request.size,
        )
        annotations = [{"bbox": box, "category_id": label, "area": box[2] * box[3], "iscrowd": 0}
                       for box, label in zip(boxes, labels)]
        return image, annotations
