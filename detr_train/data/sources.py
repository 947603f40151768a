"""Turn a `data` config into concrete image folders and annotation files.

Each dataset kind (synthetic, coco, bdd100k) may need a preparation step first
(generate images, convert labels); this module is the one place that dispatches on
`data.name`, so the trainer only ever sees plain COCO-format paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from detr_train.errors import DetrTrainError


class DatasetError(DetrTrainError, ValueError):
    """A dataset that cannot be used as configured; the message names the file or key."""


@dataclass(frozen=True)
class SplitPaths:
    """COCO-format inputs of a dataset: image folders and annotation json files."""

    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path


def resolve_under_root(root: Path, value: str | Path) -> Path:
    """Relative paths in a data config are taken relative to its `root`."""
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


def coco_paths(data_cfg) -> SplitPaths:
    root = Path(str(data_cfg.root)).expanduser()
    return SplitPaths(
        train_images=resolve_under_root(root, data_cfg.train_images),
        train_ann=resolve_under_root(root, data_cfg.train_ann),
        val_images=resolve_under_root(root, data_cfg.val_images),
        val_ann=resolve_under_root(root, data_cfg.val_ann),
    )


def validation_images_of_run(run_dir: Path) -> Path:
    """The validation images of the run in `run_dir`, from the config Hydra saved there. A
    relative `data.root` is taken from where the run was started, which Hydra recorded too.
    Raises OSError or an OmegaConf error when the run's files are missing or unreadable."""
    from omegaconf import OmegaConf

    hydra_dir = Path(run_dir) / ".hydra"
    images = coco_paths(OmegaConf.load(hydra_dir / "config.yaml").data).val_images
    if images.is_absolute():
        return images
    return Path(OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.cwd) / images
