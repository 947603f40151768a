"""Make a configured dataset ready on disk (generated, converted or as it is) and return its paths."""

from __future__ import annotations

from detr_train.data.bdd100k_layout import prepare as prepare_bdd100k
from detr_train.data.sources import SplitPaths, coco_paths
from detr_train.data.synthetic import ensure_synthetic_dataset


def prepare_dataset(data_cfg) -> SplitPaths:
    """Generate the synthetic data or convert BDD100K labels if needed; any other
    dataset is COCO json used as it is."""
    name = str(data_cfg.name)
    if name == "synthetic":
        ensure_synthetic_dataset(data_cfg)
        return coco_paths(data_cfg)
    if name == "bdd100k":
        return prepare_bdd100k(data_cfg)
    return coco_paths(data_cfg)
