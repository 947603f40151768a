"""The typed shape of detr-train's config: Hydra structured configs in the ConfigStore.

`conf/config.yaml` puts `detr_train_schema` first in its defaults list, so every YAML
file and every command-line override is merged into these dataclasses while Hydra
composes the config: an unknown key or a value of the wrong type (`training.epochs=2.5`,
`training.schedule.name=linear`) fails then, naming the key, before anything is built.
Ranges and relations between keys are checked right after by `config.checks`.

The YAML files hold the values (they are the documented defaults users read and copy);
fields here are MISSING unless a key was added after checkpoint format 1, whose default
keeps the behaviour that older checkpoints were trained with.

This module imports neither torch nor transformers: the CLI registers it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from detr_train.config.augment import AugmentConfig

SCHEMA_NAME = "detr_train_schema"


class ScheduleName(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


class AmpDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"


class NonFinitePolicy(str, Enum):
    skip = "skip"
    stop = "stop"


class AttentionKernel(str, Enum):
    auto = "auto"  # the fused Triton kernel on CUDA once it has passed its self-check, else pytorch
    triton = "triton"
    pytorch = "pytorch"


class SamplerName(str, Enum):
    uniform = "uniform"  # every training image once per epoch
    repeat_factor = "repeat_factor"  # LVIS repeat-factor sampling: images of rare classes repeat


class BackboneNorm(str, Enum):
    frozen_bn = "frozen_bn"
    batch_norm = "batch_norm"
    group_norm = "group_norm"


# --- model -----------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    # resnet: transformers' ResNet, frozen BatchNorm (for pretrained weights); bit: BiT, GroupNorm,
    # trains from scratch and exports exactly; timm: a timm model by `name`.
    type: str = "resnet"
    name: Optional[str] = None  # timm: the model, e.g. resnet50
    # ImageNet weights from timm: a timm model with its pretrained tag (resnet50.a1_in1k, implies
    # type timm), or a local weights file for `name`.
    pretrained: Optional[str] = None
    embedding_size: int = MISSING
    hidden_sizes: List[int] = MISSING
    depths: List[int] = MISSING
    layer_type: str = MISSING
    # resnet only. group_norm: GroupNorm swapped in to train from scratch (trains, cannot export).
    norm: BackboneNorm = BackboneNorm.frozen_bn
    num_groups: int = 8  # bit: GroupNorm groups
    train_stem: bool = MISSING
    out_features: List[str] = MISSING


@dataclass
class LossConfig:
    # Whole numbers (checked): transformers' DeformableDetrConfig stores these as int.
    class_cost: float = MISSING
    bbox_cost: float = MISSING
    giou_cost: float = MISSING
    bbox_loss_coefficient: float = MISSING
    giou_loss_coefficient: float = MISSING
    focal_alpha: float = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    pretrained: Optional[str] = None
    d_model: int = MISSING
    encoder_layers: int = MISSING
    decoder_layers: int = MISSING
    encoder_attention_heads: int = MISSING
    decoder_attention_heads: int = MISSING
    encoder_ffn_dim: int = MISSING
    decoder_ffn_dim: int = MISSING
    num_queries: int = MISSING
    num_feature_levels: int = MISSING
    encoder_n_points: int = MISSING
    decoder_n_points: int = MISSING
    dropout: float = MISSING
    with_box_refine: bool = MISSING
    two_stage: bool = MISSING
    auxiliary_loss: bool = MISSING
    # auto: the fused Triton kernel on CUDA, transformers' PyTorch function elsewhere.
    attention_kernel: AttentionKernel = AttentionKernel.auto
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)


# --- data ------------------------------------------------------------------------------


@dataclass
class GenerateConfig:
    """How `data=synthetic` draws its images (only that kind has it)."""

    num_train: int = MISSING
    num_val: int = MISSING
    image_size: Optional[int] = MISSING  # square images of this size, or null with image_size_range
    image_size_range: Optional[List[int]] = None  # [min, max]: width and height drawn in it
    small_shapes: bool = False  # antialiased tiny shapes (data=synthetic_small)
    classes: List[str] = MISSING
    # Relative frequency of each class among the drawn objects (null: all equal), e.g. one
    # rare class to measure data.sampler=repeat_factor.
    class_weights: Optional[List[float]] = None
    max_objects: int = MISSING
    min_object_size: int = MISSING
    max_object_size: int = MISSING
    seed: int = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    train_images: str = MISSING
    val_images: str = MISSING
    train_ann: str = MISSING
    val_ann: str = MISSING
    num_workers: int = MISSING
    persistent_workers: bool = False
    image_size: int = MISSING
    eval_size: int = MISSING
    max_size_ratio: float = MISSING
    # Training augmentation: the nested group data/augment (none | flip | detr).
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Only some kinds use these; null elsewhere.
    generate: Optional[GenerateConfig] = None  # synthetic
    uncertain: Optional[str] = None  # bdd100k: ignore | remove | merge
    cache_dir: Optional[str] = None  # bdd100k
    # Added after format 1: older checkpoints trained on every image once per epoch.
    sampler: SamplerName = SamplerName.uniform
    repeat_threshold: float = 0.001  # LVIS's t: classes in fewer than this fraction of images repeat


# --- training --------------------------------------------------------------------------


@dataclass
class ScheduleConfig:
    name: ScheduleName = MISSING
    warmup_steps: int = MISSING
    step_epochs: List[int] = MISSING
    gamma: float = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class CheckpointConfig:
    keep_last: int = MISSING
    every_n_steps: int = MISSING


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, evaluated (and exported) instead of them."""

    enabled: bool = MISSING
    decay: float = MISSING
    warmup_steps: int = MISSING  # the decay ramps up as 1 - exp(-updates / warmup_steps)
    eval_raw: bool = MISSING  # also evaluate the raw weights (logged as raw_map, ...)


@dataclass
class EarlyStopConfig:
    """Stop when validation mAP has not improved by min_delta for `patience` evaluations (0: off)."""

    patience: int = MISSING
    min_delta: float = MISSING


@dataclass
class DdpConfig:
    find_unused_parameters: bool = False
    check_replicas_every: int = 0


@dataclass
class TrainingConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    # Micro-batches per optimiser step: the effective batch is accumulate_steps x batch_size x processes.
    accumulate_steps: int = 1
    lr: float = MISSING
    backbone_lr_mult: float = MISSING
    linear_proj_lr_mult: float = MISSING
    weight_decay: float = MISSING
    grad_clip: float = MISSING
    seed: int = MISSING
    device: str = MISSING
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    amp: bool = MISSING
    amp_dtype: AmpDtype = MISSING
    nonfinite: NonFinitePolicy = MISSING
    max_nonfinite_steps: int = MISSING
    resume: Optional[str] = None
    subset_size: Optional[int] = None
    subset_seed: int = MISSING
    overfit: bool = MISSING
    overfit_size: int = MISSING
    val_subset_size: Optional[int] = None
    resize_schedule: Optional[List[List[int]]] = None
    eval_every: int = MISSING
    # Sliced evaluation (evaluation/slicing.py): tiles of this side plus the whole image; null: whole images.
    eval_slice: Optional[int] = None
    eval_slice_overlap: float = 0.2
    eval_slice_iou: float = 0.5
    log_every: int = MISSING
    # auto: progress bars only on a terminal.
    progress: Union[bool, str] = MISSING
    export_hf: bool = MISSING
    # Pictures in the run dir (detr_train/reporting/visual_callbacks.py): training_curves.png every epoch,
    # plots/per_class_ap.png, plots/pr_curves.png and plots/confusion_matrix.png at each evaluation.
    plots: bool = True
    # Predictions | ground truth on the first N validation images at each evaluation (vis/); 0: none.
    vis_images: int = 0
    # Predicted boxes below this score are neither drawn nor counted in the confusion matrix.
    vis_score_threshold: float = 0.3
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    # CUDA speed switches (ignored elsewhere); see fast_paths.py.
    tf32: bool = True
    fused_optimizer: bool = True
    channels_last: bool = False
    compile: bool = False


# --- budget, search channel, root --------------------------------------------------------


@dataclass
class BudgetConfig:
    """Caps, not demands: a run trains min(its own setting, the cap)."""

    max_epochs: Optional[int] = None
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None


@dataclass
class TrialConfig:
    """Filled in by the sweeper for each trial of a search; null outside one."""

    study_name: Optional[str] = None
    storage: Optional[str] = None
    number: Optional[int] = None
    # The sweep's MLflow run, parent of the trial's own (logger.mlflow set).
    mlflow_parent_run_id: Optional[str] = None


# --- experiment trackers (the `logger` group) ----------------------------------------------


@dataclass
class TensorBoardLoggerConfig:
    """logger=tensorboard: events in <run dir>/tensorboard; nothing to set."""


@dataclass
class MlflowLoggerConfig:
    # null: sqlite:///<output_root>/mlruns/mlflow.db, artifacts in <output_root>/mlruns/artifacts.
    tracking_uri: Optional[str] = None
    experiment_name: str = MISSING
    artifacts: bool = True  # curves, plots and prediction images as run artifacts


@dataclass
class LoggerConfig:
    """The trackers a run logs to: each one that is not null (`logger=[tensorboard,mlflow]`)."""

    tensorboard: Optional[TensorBoardLoggerConfig] = None
    mlflow: Optional[MlflowLoggerConfig] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    # No tracker unless chosen: checkpoints written before the group existed resume without one.
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = MISSING
    output_root: str = MISSING


def register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config, provider="detr_train")
