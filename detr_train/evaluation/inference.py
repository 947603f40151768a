"""A trained detector ready for inference, from wherever a user keeps it.

`load_for_inference` takes a checkpoint file, a run directory (its `best.pt`) or a folder
written by `save_pretrained` (`hf_model/`, or any Deformable DETR in that format) and
returns the model with its class names, image processor and config:

- a checkpoint brings the run's own config; `key=value` overrides change it (another
  `data.root`, the full validation set with `training.val_subset_size=null`, ...);
- an exported folder has no run config: the project's defaults apply, composed with the
  overrides the way `detr-train` composes them (`data=coco data.root=...`).

The weights are the ones the run scored: its EMA weights when it kept them (the raw ones
when `best.pt` says those scored best). Nothing here writes anything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detr_train.checkpointing.checkpointer import BEST, CHECKPOINT_DIR, LAST, Found
from detr_train.checkpointing.format import (
    KEY_CLASS_NAMES,
    KEY_MODEL_CONFIG,
    STATE_EMA,
    STATE_MODEL,
    CheckpointError,
    load_checkpoint,
    train_state_of,
)
from detr_train.errors import ConfigError, DetrTrainError

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
HF_PROCESSOR = "preprocessor_config.json"


class ModelSourceError(DetrTrainError, ValueError):
    """The path given as the model is none of the things a model can be loaded from."""


@dataclass
class InferenceModel:
    model: torch.nn.Module  # in eval mode, on the device asked for
    class_names: list[str]  # by model label
    processor: object  # the DeformableDetrImageProcessor the model was evaluated with
    cfg: DictConfig  # the run's config (or the defaults), overrides applied
    source: Path  # the file or folder the weights came from
    weights: str  # which weights: "model", "ema" or "exported"
    epoch: int | None = None  # the checkpoint's epoch


def locate_model(path: Path) -> tuple[str, Path]:
    """("checkpoint", file) or ("exported", folder) for a checkpoint file, run dir or HF folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return "checkpoint", path
    if path.is_dir():
        if (path / HF_CONFIG).is_file():
            return "exported", path
        for folder in (path / CHECKPOINT_DIR, path):
            for name in (BEST, LAST):
                if (folder / name).is_file():
                    if name == LAST:
                        log.warning("%s has no %s (nothing was evaluated yet): using %s", folder, BEST, LAST)
                    return "checkpoint", folder / name
        raise ModelSourceError(
            f"{path}: not a run directory (no {CHECKPOINT_DIR}/{BEST} or {LAST}) and not an exported model "
            f"folder (no {HF_CONFIG})",
        )
    raise ModelSourceError(f"model not found: {path} does not exist")


def load_for_inference(path: Path, overrides: list[str], device: torch.device) -> InferenceModel:
    kind, where = locate_model(path)
    loaded = _from_checkpoint(where, overrides) if kind == "checkpoint" else _from_exported(where, overrides)
    loaded.model.to(device).eval()
    log.info("Loaded %s (%s weights%s, %d classes)", loaded.source, loaded.weights,
             "" if loaded.epoch is None else f" of epoch {loaded.epoch}", len(loaded.class_names))
    return loaded


# --- a detr_train checkpoint -----------------------------------------------------------------


def _from_checkpoint(path: Path, overrides: list[str]) -> InferenceModel:
    from detr_train.checkpointing.plan import checkpoint_config
    from detr_train.modeling.build import build_image_processor, build_model

    payload = load_checkpoint(path)
    cfg = apply_overrides(checkpoint_config(Found(path, payload)), overrides)
    class_names = list(payload.get(KEY_CLASS_NAMES) or [])
    if not class_names:
        raise CheckpointError(f"checkpoint {path} does not record its class names")
    saved_architecture = payload.get(KEY_MODEL_CONFIG)
    model_cfg = cfg.model
    if saved_architecture is None:
        # An older checkpoint: rebuild from its config, fetching no pretrained weights (the
        # checkpoint holds them all).
        model_cfg = OmegaConf.merge(cfg.model, {"pretrained": None, "backbone": {"pretrained": None}})
    model = build_model(model_cfg, class_names,
                        architecture=None if saved_architecture is None else json.loads(saved_architecture))
    weights = _scored_weights(payload, path)
    try:
        model.load_state_dict(payload[STATE_EMA]["weights"] if weights == "ema" else payload[STATE_MODEL])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model its config describes "
                              f"({str(exc).strip().splitlines()[0]})") from exc
    processor = build_image_processor(cfg.data.eval_size, cfg.data.max_size_ratio)
    return InferenceModel(model, class_names, processor, cfg, path, weights, int(train_state_of(payload)["epoch"]))


def _scored_weights(payload: dict, path: Path) -> str:
    """The weights evaluation scored: EMA when kept, unless best.pt says the raw ones won."""
    if STATE_EMA not in payload:
        return "model"
    state = train_state_of(payload)
    if path.name == BEST and state.get("best_weights") == "model":
        return "model"
    return "ema"


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`key=value` overrides of an existing key each; one clear error for a bad one."""
    cfg = cfg.copy()
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} is not key=value")
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            raise ConfigError(f"override {override!r}: the run's config has no key {key!r}")
        try:
            value = OmegaConf.from_dotlist([override])
            cfg = OmegaConf.merge(cfg, value)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {override!r}: {str(exc).strip().splitlines()[0]}") from exc
    return cfg


_MISSING = object()


# --- a save_pretrained folder ----------------------------------------------------------------


def _from_exported(folder: Path, overrides: list[str]) -> InferenceModel:
    from transformers import DeformableDetrForObjectDetection, DeformableDetrImageProcessor

    from detr_train.config.preflight import compose_checked
    from detr_train.modeling.build import build_image_processor

    cfg = compose_checked(overrides)
    try:
        model, info = DeformableDetrForObjectDetection.from_pretrained(str(folder), output_loading_info=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelSourceError(f"cannot load the model in {folder}: {str(exc).strip().splitlines()[0]}") from exc
    missing = [key for key in info.get("missing_keys", []) if not key.endswith("num_batches_tracked")]
    if missing:
        raise ModelSourceError(f"{folder} does not hold the whole network: {len(missing)} weight(s) missing "
                               f"(e.g. {missing[0]}) would be random")
    config = model.config
    class_names = [str(config.id2label[i]) for i in range(config.num_labels)]
    if (folder / HF_PROCESSOR).is_file():
        processor = DeformableDetrImageProcessor.from_pretrained(str(folder))
        _adopt_processor_size(cfg, processor, overrides)
    else:
        processor = build_image_processor(cfg.data.eval_size, cfg.data.max_size_ratio)
    return InferenceModel(model, class_names, processor, cfg, folder, "exported")


def _adopt_processor_size(cfg: DictConfig, processor, overrides: list[str]) -> None:
    """Evaluate at the size the folder's processor was saved with, unless the command line says otherwise."""
    size = processor.size
    shortest, longest = size.get("shortest_edge"), size.get("longest_edge")
    if not shortest:
        return
    named = {override.partition("=")[0] for override in overrides}
    if "data.eval_size" not in named:
        cfg.data.eval_size = int(shortest)
    if longest and "data.max_size_ratio" not in named:
        cfg.data.max_size_ratio = float(longest) / cfg.data.eval_size
