"""Build the Deformable DETR model and its image processor from the `model` config."""

from __future__ import annotations

import logging
import math

import torch

from detr_train.config.checks import WHOLE_LOSS_KEYS
from detr_train.config.schema import BackboneConfig, BackboneNorm, ModelConfig
from detr_train.modeling.pretrained import (  # noqa: F401 - PretrainedUnavailableError: part of this module's API
    PretrainedUnavailableError,
    load_detector,
    load_timm_backbone_weights,
    timm_architecture,
)

log = logging.getLogger(__name__)


ARCHITECTURE_KEYS = (
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
    "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "num_feature_levels", "encoder_n_points",
    "decoder_n_points", "dropout", "with_box_refine", "two_stage", "auxiliary_loss",
)


def _architecture_kwargs(model_cfg: ModelConfig) -> dict:
    return {
        **{key: model_cfg[key] for key in ARCHITECTURE_KEYS},
        **{key: int(model_cfg.loss[key]) for key in WHOLE_LOSS_KEYS},
        "focal_alpha": model_cfg.loss.focal_alpha,
        # Two-stage: the encoder proposals that become the decoder's queries, one per query
        # as in Deformable DETR (transformers' default of 300 ignores num_queries).
        "two_stage_num_proposals": model_cfg.num_queries,
    }


def is_timm(backbone_cfg: BackboneConfig) -> bool:
    """A timm backbone: asked for by type, or implied by ImageNet weights from timm."""
    return backbone_cfg.type == "timm" or bool(backbone_cfg.pretrained)


def _stage_index(feature: str) -> int:
    """`stage3` -> 3: transformers' and timm's ResNets number their stages alike (0 is the stem)."""
    return int(feature.removeprefix("stage"))


def backbone_config(model_cfg: ModelConfig):
    """The backbone's transformers config, by `model.backbone.type`:

    - `resnet`: transformers' ResNet, BatchNorm frozen (for ImageNet-pretrained weights);
    - `bit`: transformers' BiT (ResNet v2 with GroupNorm and weight standardisation): trains
      from scratch at any batch size, and save_pretrained/from_pretrained rebuild it exactly;
    - `timm`: a timm model (`model.backbone.name`, or the architecture of
      `model.backbone.pretrained`), BatchNorm frozen.
    """
    from transformers import BitConfig, ResNetConfig, TimmBackboneConfig

    cfg = model_cfg.backbone
    out_features = list(cfg.out_features)
    if is_timm(cfg):
        return TimmBackboneConfig(backbone=timm_architecture(cfg.name or cfg.pretrained),
                                  out_indices=[_stage_index(f) for f in out_features])
    sizes = {"embedding_size": cfg.embedding_size, "hidden_sizes": list(cfg.hidden_sizes), "depths": list(cfg.depths),
             "layer_type": cfg.layer_type, "out_features": out_features}
    if cfg.type == "bit":
        return BitConfig(num_groups=cfg.num_groups, **sizes)
    if cfg.type == "convnext":
        from transformers import ConvNextConfig

        return ConvNextConfig(num_stages=len(cfg.hidden_sizes), hidden_sizes=list(cfg.hidden_sizes),
                              depths=list(cfg.depths), out_features=out_features)
    return ResNetConfig(**sizes)


def build_model_config(model_cfg: ModelConfig, class_names: list[str]):
    """A random-init DeformableDetrConfig for this model config and these classes."""
    from transformers import DeformableDetrConfig

    return DeformableDetrConfig(
        backbone_config=backbone_config(model_cfg),
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        **_architecture_kwargs(model_cfg),
    )


def _group_norm_for(frozen) -> torch.nn.GroupNorm:
    channels = frozen.weight.shape[0]
    return torch.nn.GroupNorm(math.gcd(8, channels), channels)


def _batch_norm_for(frozen) -> torch.nn.BatchNorm2d:
    return torch.nn.BatchNorm2d(frozen.weight.shape[0])


def uses_swapped_group_norm(model_cfg: ModelConfig) -> bool:
    """transformers' ResNet with GroupNorm swapped in for its frozen BatchNorm (`norm: group_norm`):
    it trains and resumes, but save_pretrained cannot describe it (use type bit to export)."""
    return model_cfg.backbone.type == "resnet" and model_cfg.backbone.norm == BackboneNorm.group_norm


def adapt_backbone(model, model_cfg: ModelConfig) -> None:
    """Which backbone layers train, and the ResNet's normalisation layers (`norm`).

    transformers assumes an ImageNet-pretrained ResNet: it freezes BatchNorm and the stem +
    first stage. `train_stem` trains them too (training from scratch); a timm backbone's stem
    and first stage are frozen the same way unless it is set.
    """
    backbone = model.model.backbone.model
    norm = model_cfg.backbone.norm
    if model_cfg.backbone.type == "resnet" and norm != BackboneNorm.frozen_bn:
        swap = _group_norm_for if norm == BackboneNorm.group_norm else _batch_norm_for
        for parent in list(backbone.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child).__name__ == "DeformableDetrFrozenBatchNorm2d":
                    setattr(parent, child_name, swap(child))
    if model_cfg.backbone.train_stem:
        for parameter in backbone.parameters():
            parameter.requires_grad_(True)
    elif is_timm(model_cfg.backbone):
        _freeze_before(backbone, backbone.feature_info.module_name()[0])


def _freeze_before(backbone: torch.nn.Module, first_output: str) -> None:
    """Freeze the modules that come before the first returned stage (stem and stage 1)."""
    for name, child in backbone.named_children():
        if name == first_output:
            return
        for parameter in child.parameters():
            parameter.requires_grad_(False)


def build_model(model_cfg: ModelConfig, class_names: list[str], *, architecture: dict | None = None):
    """The detection model: pretrained weights (`model.pretrained`, class head resized), or
    random init from the config, with an ImageNet backbone if `model.backbone.pretrained`.

    `architecture` (a DeformableDetrConfig as a dict, from a checkpoint) rebuilds the very
    model a run was trained with, downloading nothing: its weights come from the checkpoint.
    """
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    if architecture is not None:
        model = DeformableDetrForObjectDetection(DeformableDetrConfig.from_dict(architecture))
        adapt_backbone(model, model_cfg)
        return model
    if model_cfg.pretrained:
        model = load_detector(model_cfg.pretrained, class_names)
        log.info("Loaded a %s Deformable DETR from model.pretrained=%s (class head resized to %d classes); its "
                 "architecture is the checkpoint's, the architecture keys of the model config are not used",
                 _variant(model.config), model_cfg.pretrained, len(class_names))
        return model
    model = DeformableDetrForObjectDetection(build_model_config(model_cfg, class_names))
    backbone_cfg = model_cfg.backbone
    if backbone_cfg.pretrained:
        load_timm_backbone_weights(model.model.backbone.model, backbone_cfg.pretrained,
                                   timm_architecture(backbone_cfg.name or backbone_cfg.pretrained),
                                   [_stage_index(f) for f in backbone_cfg.out_features])
    adapt_backbone(model, model_cfg)
    log.info("Built %s (%s, %s backbone%s): %.2fM parameters, %d classes", model_cfg.name, _variant(model.config),
             backbone_cfg.type, f" from {backbone_cfg.pretrained}" if backbone_cfg.pretrained else "",
             sum(p.numel() for p in model.parameters()) / 1e6, len(class_names))
    return model


def _variant(config) -> str:
    if config.two_stage:
        return "two-stage"
    return "box-refinement" if config.with_box_refine else "plain"


def build_image_processor(eval_size: int, max_size_ratio: float):
    """The HF processor; training changes only the per-call size (progressive resizing)."""
    from transformers import DeformableDetrImageProcessor

    from detr_train.data.collate import processor_size

    return DeformableDetrImageProcessor(size=processor_size(eval_size, max_size_ratio))
