"""detr_train: train HuggingFace Deformable DETR on COCO-format data with Hydra configs."""

__version__ = "0.1.0"
