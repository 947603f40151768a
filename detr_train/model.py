"""Build the Deformable DETR model and its image processor from the `model` config."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from detr_train.config.checks import WHOLE_LOSS_KEYS
from detr_train.config.schema import BackboneNorm, ModelConfig
from detr_train.errors import DetrTrainError

log = logging.getLogger(__name__)


class PretrainedUnavailableError(DetrTrainError, RuntimeError):
    """Pretrained weights were asked for but cannot be found or fetched."""


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


def build_model_config(model_cfg: ModelConfig, class_names: list[str]):
    """A random-init DeformableDetrConfig with a transformers ResNet backbone (no timm needed)."""
    from transformers import DeformableDetrConfig, ResNetConfig

    backbone_cfg = model_cfg.backbone
    backbone = ResNetConfig(
        embedding_size=backbone_cfg.embedding_size,
        hidden_sizes=list(backbone_cfg.hidden_sizes),
        depths=list(backbone_cfg.depths),
        layer_type=backbone_cfg.layer_type,
        out_features=list(backbone_cfg.out_features),
    )
    return DeformableDetrConfig(
        backbone_config=backbone,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
        **_architecture_kwargs(model_cfg),
    )


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the model hub cannot be reached, or None. Fails in seconds where the hub
    client would retry for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {constants.ENDPOINT}: {exc}"
    return None


def _load_pretrained(source: str, class_names: list[str]):
    from transformers import DeformableDetrForObjectDetection

    local = Path(source).expanduser()
    label_kwargs = {
        "num_labels": len(class_names),
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: i for i, name in enumerate(class_names)},
        # The class head is re-initialised for this dataset's classes.
        "ignore_mismatched_sizes": True,
    }
    if local.is_dir():
        return DeformableDetrForObjectDetection.from_pretrained(str(local), **label_kwargs)
    if local.suffix or source.startswith((".", "/", "~")):
        raise PretrainedUnavailableError(f"model.pretrained={source!r}: no such local folder")
    try:
        try:
            # A cached copy needs no network at all.
            return DeformableDetrForObjectDetection.from_pretrained(source, local_files_only=True, **label_kwargs)
        except OSError:
            pass
        endpoint_problem = _hub_unreachable()
        if endpoint_problem:
            raise OSError(endpoint_problem)
        return DeformableDetrForObjectDetection.from_pretrained(source, **label_kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise PretrainedUnavailableError(
            f"could not load pretrained weights model.pretrained={source!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Without network access, either train from "
            f"scratch with model.pretrained=null, or point model.pretrained at a local folder written by "
            f"save_pretrained (or a downloaded hub snapshot)."
        ) from exc


def _group_norm_for(frozen) -> torch.nn.GroupNorm:
    channels = frozen.weight.shape[0]
    return torch.nn.GroupNorm(math.gcd(8, channels), channels)


def adapt_backbone(model, *, norm: BackboneNorm, train_stem: bool) -> None:
    """Make transformers' backbone trainable from scratch when asked.

    transformers assumes an ImageNet-pretrained backbone: it freezes BatchNorm and
    the stem + first stage. A randomly initialised backbone cannot learn like that,
    so a from-scratch model swaps in GroupNorm (batch-size independent) and trains
    every backbone layer.
    """
    backbone = model.model.backbone.model
    if norm == BackboneNorm.group_norm:
        for parent in list(backbone.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child).__name__ == "DeformableDetrFrozenBatchNorm2d":
                    setattr(parent, child_name, _group_norm_for(child))
    if train_stem:
        for parameter in backbone.parameters():
            parameter.requires_grad_(True)


def build_model(model_cfg: ModelConfig, class_names: list[str]):
    """The detection model: random init from the config, or pretrained weights with a resized head."""
    if model_cfg.pretrained:
        model = _load_pretrained(model_cfg.pretrained, class_names)
        log.info("Loaded pretrained weights from %s (class head resized to %d classes)", model_cfg.pretrained, len(class_names))
        return model
    from transformers import DeformableDetrForObjectDetection

    model = DeformableDetrForObjectDetection(build_model_config(model_cfg, class_names))
    adapt_backbone(model, norm=model_cfg.backbone.norm, train_stem=model_cfg.backbone.train_stem)
    log.info(
        "Built %s from scratch: %.2fM parameters, %d classes",
        model_cfg.name,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(class_names),
    )
    return model


def build_image_processor(eval_size: int, max_size_ratio: float):
    """The HF processor; training changes only the per-call size (progressive resizing)."""
    from transformers import DeformableDetrImageProcessor

    from detr_train.data.collate import processor_size

    return DeformableDetrImageProcessor(size=processor_size(eval_size, max_size_ratio))
