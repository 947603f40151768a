"""Value checks the schema's types cannot express: ranges, and keys that must agree.

`check_config(cfg)` runs once, right after Hydra composes the config and before any file
is written; the first problem raises a `ConfigError` naming the key and the value. What
needs the data (a subset larger than the dataset) or the machine (is CUDA there?) is
checked where those are known.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from detr_train.config.augment import validate_augment_config
from detr_train.config.resize_schedule import validate_resize_schedule
from detr_train.config.schema import BackboneNorm
from detr_train.config.synthetic import check_generate_settings
from detr_train.errors import ConfigError

# transformers' DeformableDetrConfig stores these as int.
WHOLE_LOSS_KEYS = ("class_cost", "bbox_cost", "giou_cost", "bbox_loss_coefficient", "giou_loss_coefficient")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
TENSORBOARD_MISSING = ("logger=tensorboard needs the tensorboard package, which is not installed: "
                       "pip install 'detr-train[tensorboard]' (or choose another logger)")
MLFLOW_MISSING = ("logger=mlflow needs the mlflow package, which is not installed: "
                  "pip install 'detr-train[mlflow]' (or choose another logger)")


def _positive(value) -> bool:
    return value > 0


def _non_negative(value) -> bool:
    return value >= 0


def _probability(value) -> bool:
    return 0.0 <= value <= 1.0


# key -> (test, what the value must be); null values of optional keys are not tested.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "training.epochs": (_positive, ">= 1"),
    "training.batch_size": (_positive, ">= 1"),
    "training.accumulate_steps": (_positive, ">= 1"),
    "training.lr": (_positive, "> 0"),
    "training.backbone_lr_mult": (_non_negative, ">= 0"),
    "training.linear_proj_lr_mult": (_non_negative, ">= 0"),
    "training.weight_decay": (_non_negative, ">= 0"),
    "training.grad_clip": (_non_negative, ">= 0 (0 disables clipping)"),
    "training.max_nonfinite_steps": (_non_negative, ">= 0"),
    "training.subset_size": (_positive, ">= 1 or null"),
    "training.overfit_size": (_positive, ">= 1"),
    "training.val_subset_size": (_positive, ">= 1 or null"),
    "training.eval_every": (_positive, ">= 1"),
    # Smaller tiles than the backbone's coarsest stride leave no feature map to detect on.
    "training.eval_slice": (lambda v: v >= 32, ">= 32 (pixels) or null"),
    "training.eval_slice_overlap": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "training.eval_slice_iou": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "training.log_every": (_non_negative, ">= 0 (0 disables step logging)"),
    "training.schedule.warmup_steps": (_non_negative, ">= 0"),
    "training.schedule.gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "training.schedule.min_lr_ratio": (_probability, "in [0, 1]"),
    "training.checkpoint.keep_last": (_non_negative, ">= 0"),
    "training.checkpoint.every_n_steps": (_non_negative, ">= 0 (0 disables mid-epoch checkpoints)"),
    "training.ddp.check_replicas_every": (_non_negative, ">= 0"),
    "training.ema.decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "training.ema.warmup_steps": (_non_negative, ">= 0"),
    "training.early_stop.patience": (_non_negative, ">= 0 (0 disables early stopping)"),
    "training.early_stop.min_delta": (_non_negative, ">= 0"),
    "training.vis_images": (_non_negative, ">= 0 (0 draws none)"),
    "training.vis_score_threshold": (_probability, "in [0, 1]"),
    "model.d_model": (_positive, ">= 1"),
    "model.encoder_layers": (_positive, ">= 1"),
    # transformers ties the per-layer bbox heads and fails at init with one decoder layer.
    "model.decoder_layers": (lambda v: v >= 2, ">= 2"),
    "model.encoder_attention_heads": (_positive, ">= 1"),
    "model.decoder_attention_heads": (_positive, ">= 1"),
    "model.encoder_ffn_dim": (_positive, ">= 1"),
    "model.decoder_ffn_dim": (_positive, ">= 1"),
    "model.num_queries": (_positive, ">= 1"),
    "model.num_feature_levels": (_positive, ">= 1"),
    "model.encoder_n_points": (_positive, ">= 1"),
    "model.decoder_n_points": (_positive, ">= 1"),
    "model.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.loss.focal_alpha": (_probability, "in [0, 1]"),
    "data.num_workers": (_non_negative, ">= 0"),
    "data.image_size": (_positive, ">= 1"),
    "data.eval_size": (_positive, ">= 1"),
    "data.max_size_ratio": (lambda v: v >= 1, ">= 1 (longest edge = ratio x shortest edge)"),
    "data.repeat_threshold": (lambda v: 0 < v <= 1, "in (0, 1] (a fraction of the training images)"),
    "budget.max_epochs": (_positive, ">= 1 or null"),
    "budget.max_train_images": (_positive, ">= 1 or null"),
    "budget.max_val_images": (_positive, ">= 1 or null"),
}

_REQUIRED = {
    "data.root": "the dataset folder, e.g. data.root=/data/coco",
}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value that cannot work."""
    _check_required(cfg)
    for key, (test, expected) in _RULES.items():
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
        if value is not None and not test(value):
            raise ConfigError(f"{key} must be {expected}, got {value!r}")
    _check_device(cfg.training.device)
    _check_progress(cfg.training.progress)
    _check_loggers(cfg.logger)
    _check_resize_schedule(cfg.training.resize_schedule)
    _check_tiles_without_schedule(cfg)
    _check_model(cfg.model)
    _check_backbone(cfg.model.backbone)
    validate_augment_config(cfg.data.augment)
    if cfg.data.name == "synthetic" and cfg.data.generate is not None:
        check_generate_settings(cfg.data.generate)
    _check_whole("model.loss", cfg.model.loss, WHOLE_LOSS_KEYS)
    _check_each_positive("training.schedule.step_epochs", cfg.training.schedule.step_epochs)
    _check_each_positive("model.backbone.hidden_sizes", cfg.model.backbone.hidden_sizes)
    _check_each_positive("model.backbone.depths", cfg.model.backbone.depths)


def _check_required(cfg: DictConfig) -> None:
    for key, what in _REQUIRED.items():
        parent, _, leaf = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf):
            raise ConfigError(f"{key} is required here: {what}")
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} has no value (???); set it on the command line, e.g. {missing[0]}=...")


def _missing_keys(node: Any, prefix: str = "") -> Iterable[str]:
    if not isinstance(node, DictConfig):
        return
    for key in node.keys():
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            yield full
        else:
            yield from _missing_keys(node[key], full + ".")


def _check_device(device: str) -> None:
    if not _DEVICE.match(device):
        raise ConfigError(f"training.device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_progress(progress: Any) -> None:
    if not isinstance(progress, bool) and progress != "auto":
        raise ConfigError(f"training.progress must be auto, true or false, got {progress!r}")


def _check_loggers(logger: DictConfig) -> None:
    if logger.tensorboard is not None:
        try:
            import tensorboard  # noqa: F401 - the package alone, without torch: a config check must stay fast
        except ImportError:
            raise ConfigError(TENSORBOARD_MISSING) from None
    # Found, not imported: importing mlflow takes seconds, and the run imports it anyway.
    if logger.mlflow is not None and not _installed("mlflow"):
        raise ConfigError(MLFLOW_MISSING)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a None left in sys.modules says "not installed" too
        return False


def _check_each_positive(key: str, values) -> None:
    for position, value in enumerate(values or []):
        if value <= 0:
            raise ConfigError(f"{key}[{position}] must be >= 1, got {value}")


def _check_whole(prefix: str, node: DictConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = node[key]
        if value < 0 or value != int(value):
            raise ConfigError(f"{prefix}.{key} must be a whole number >= 0 (transformers stores it as int), got {value}")


def _check_model(model: DictConfig) -> None:
    for side in ("encoder", "decoder"):
        heads = model[f"{side}_attention_heads"]
        if model.d_model % heads:
            raise ConfigError(
                f"model.d_model={model.d_model} must be divisible by model.{side}_attention_heads={heads}"
            )
    features = list(model.backbone.out_features)
    if model.num_feature_levels < len(features):
        raise ConfigError(
            f"model.num_feature_levels={model.num_feature_levels} is smaller than the number of "
            f"model.backbone.out_features ({features})"
        )


BACKBONE_TYPES = ("resnet", "bit", "convnext", "timm")


def _check_backbone(backbone: DictConfig) -> None:
    if backbone.type not in BACKBONE_TYPES:
        raise ConfigError(f"model.backbone.type must be one of {', '.join(BACKBONE_TYPES)}, got {backbone.type!r}")
    if backbone.type == "resnet" and backbone.norm == BackboneNorm.group_norm:
        # Runs trained with it still resume: a resume builds the model from the checkpoint's config.
        raise ConfigError(
            "model.backbone.norm=group_norm is kept only to resume runs trained with it: its model cannot be "
            "exported, and the default BiT backbone now learns faster",
            hint="train from scratch with the default model (model=deformable_detr_tiny, a BiT backbone)",
        )
    if backbone.type == "timm" and not (backbone.name or backbone.pretrained):
        raise ConfigError("model.backbone.type=timm needs model.backbone.name (a timm model, e.g. resnet50)")
    for position, feature in enumerate(backbone.out_features):
        if not re.fullmatch(r"stage[1-9]", feature):
            raise ConfigError(f"model.backbone.out_features[{position}] must be stage1 ... stage9, got {feature!r}")
    if backbone.type == "bit":
        groups = backbone.num_groups
        for key, sizes in (("embedding_size", [backbone.embedding_size]), ("hidden_sizes", list(backbone.hidden_sizes))):
            if groups < 1 or any(size % groups for size in sizes):
                value = sizes if key == "hidden_sizes" else sizes[0]
                raise ConfigError(f"model.backbone.{key}={value} must be divisible by "
                                  f"model.backbone.num_groups={groups} (GroupNorm)")


def _check_tiles_without_schedule(cfg: DictConfig) -> None:
    tile = cfg.data.augment.tile.size
    if tile is not None and cfg.training.resize_schedule is not None and not cfg.training.overfit:
        raise ConfigError(
            f"training.resize_schedule cannot apply with data.augment.tile.size={tile}: tiles are cut at native "
            f"resolution and never resized, so the tile side is the training size",
            hint="set training.resize_schedule=null, or train without tiles",
        )


def _check_resize_schedule(schedule) -> None:
    validate_resize_schedule(None if schedule is None else OmegaConf.to_container(schedule))
