"""`data=bdd100k`: the official BDD100K layout under `data.root`, checked, with its labels
converted to COCO json on first use.

`prepare(data_cfg)` checks the standard layout (`images/100k/{train,val}`,
`labels/det_20/det_{train,val}.json`), converts each label file on first use into
`<labels dir>/coco/<stem>_<uncertain>.json` (reused while newer than its source, see
`detr_train.data.bdd100k` for the conversion) and returns the COCO paths. Annotation files
that are already COCO json are used as they are.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from detr_train.data.bdd100k import check_uncertain_handling, convert_file
from detr_train.data.sources import DatasetError, SplitPaths, resolve_under_root

log = logging.getLogger(__name__)

# Layout of the official download, relative to data.root (also the config defaults).
STANDARD_LAYOUT = (
    "<root>/images/100k/{train,val}/*.jpg\n"
    "<root>/labels/det_20/det_{train,val}.json"
)


def prepare(data_cfg) -> SplitPaths:
    """Check the BDD100K layout under `data.root`, convert labels if needed, return COCO paths.

    Each `*_ann` may be an official BDD100K label file (converted once into a cache,
    `data.cache_dir` or `<labels dir>/coco/`) or an already-converted COCO json (used as
    is). Raises `DatasetError` listing every missing path when the layout is wrong.
    """
    root = Path(str(data_cfg.root)).expanduser()
    uncertain = check_uncertain_handling(str(data_cfg.get("uncertain", "ignore")))
    cache_dir = data_cfg.get("cache_dir")
    paths = SplitPaths(
        train_images=resolve_under_root(root, data_cfg.train_images),
        train_ann=resolve_under_root(root, data_cfg.train_ann),
        val_images=resolve_under_root(root, data_cfg.val_images),
        val_ann=resolve_under_root(root, data_cfg.val_ann),
    )
    check_layout(root, paths)
    cache = None if cache_dir is None else resolve_under_root(root, cache_dir)
    return SplitPaths(
        train_images=paths.train_images,
        train_ann=coco_annotations(paths.train_ann, paths.train_images, uncertain, cache),
        val_images=paths.val_images,
        val_ann=coco_annotations(paths.val_ann, paths.val_images, uncertain, cache),
    )


def check_layout(root: Path, paths: SplitPaths) -> None:
    """Raise one DatasetError that lists everything missing, not just the first thing."""
    missing = []
    if not root.is_dir():
        missing.append(f"data.root: {root} (not a folder)")
    for key, path, want_dir in (
        ("data.train_images", paths.train_images, True),
        ("data.val_images", paths.val_images, True),
        ("data.train_ann", paths.train_ann, False),
        ("data.val_ann", paths.val_ann, False),
    ):
        if not (path.is_dir() if want_dir else path.is_file()):
            missing.append(f"{key}: {path} ({'folder' if want_dir else 'file'})")
    if missing:
        raise DatasetError(
            f"BDD100K dataset under {root} is incomplete; missing:\n"
            + "\n".join(f"  - {line}" for line in missing)
            + f"\nExpected the official layout:\n{STANDARD_LAYOUT}\n"
            "Set data.root to the folder that holds images/ and labels/, or point "
            "data.train_images / data.val_images / data.train_ann / data.val_ann at your "
            "files (relative to data.root or absolute; *_ann may also be COCO json)."
        )


def coco_annotations(ann_path: Path, images_dir: Path, uncertain: str, cache_dir: Path | None) -> Path:
    """The COCO json for one split: the file itself if it is COCO, else its cached conversion."""
    if label_file_kind(ann_path) == "coco":
        log.info("using COCO annotations %s as they are", ann_path)
        return ann_path
    cache_dir = cache_dir if cache_dir is not None else ann_path.parent / "coco"
    cached = cache_dir / f"{ann_path.stem}_{uncertain}.json"
    if cached.is_file() and cached.stat().st_mtime >= ann_path.stat().st_mtime:
        log.info("using converted labels %s (delete it to convert %s again)", cached, ann_path)
        return cached
    try:
        convert_file(ann_path, cached, uncertain=uncertain, images_dir=images_dir)
    except OSError as error:
        raise DatasetError(
            f"cannot write converted labels to {cached} ({error}); set data.cache_dir to a "
            "writable folder"
        ) from error
    return cached


_FIRST_KEY = re.compile(r'^\{\s*"((?:[^"\\]|\\.)*)"')


def label_file_kind(path: Path) -> str:
    """'bdd' or 'coco', from the start of the file (label files are too big to parse twice).

    BDD100K files are a JSON list of frames, or Scalabel's {"config"/"frames": ...}
    object; any other JSON object is taken for COCO json.
    """
    with open(path, "rb") as file:
        head = file.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith("["):
        return "bdd"
    if head.startswith("{"):
        match = _FIRST_KEY.match(head)
        return "bdd" if match and match.group(1) in ("frames", "config", "groups") else "coco"
    raise DatasetError(f"{path}: not a JSON label file (it should start with '[' or '{{')")
