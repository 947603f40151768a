"""From the `data` and `training` configs to the datasets and loaders a run trains on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from detr_train.config.schema import BudgetConfig, DataConfig, SamplerName, TrainingConfig
from detr_train.data.augment import Augmenter
from detr_train.data.coco import CocoDetectionDataset
from detr_train.data.collate import DetrCollator
from detr_train.data.prepare import prepare_dataset
from detr_train.data.repeat_factor import RepeatFactors, repeat_factors
from detr_train.data.sampling import EpochBatchSampler, select_training_images
from detr_train.data.sources import DatasetError, SplitPaths
from detr_train.data.workers import ignore_stop_signals
from detr_train.distributed.launch import DistContext

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train: CocoDetectionDataset | None  # None when only evaluation data was asked for
    val: CocoDetectionDataset
    val_ann: Path
    class_names: list[str]
    # data.sampler=repeat_factor: the training images' factors; None: each image once per epoch.
    repeat_factors: RepeatFactors | None = None


def capped(value: int | None, cap: int | None) -> int | None:
    """A budget is a cap, not a demand: the smaller of a setting and its cap (either may be null)."""
    if cap is None:
        return value
    return cap if value is None else min(value, cap)


def build_data(data_cfg: DataConfig, train_cfg: TrainingConfig, budget: BudgetConfig) -> DataBundle:
    paths = prepare_dataset(data_cfg)
    overfit = train_cfg.overfit
    full_train = CocoDetectionDataset(paths.train_images, paths.train_ann, seed=train_cfg.seed,
                                      default_size=data_cfg.image_size)
    train_ids = select_training_images(
        full_train.image_ids, subset_size=train_cfg.subset_size, subset_seed=train_cfg.subset_seed,
        overfit=overfit, overfit_size=train_cfg.overfit_size, budget_cap=budget.max_train_images,
        source=f"training set {paths.train_ann}",
    )
    train = full_train.subset(train_ids)
    # Overfit mode trains on, and scores, the very same images, unaugmented.
    train.augmenter = None if overfit else build_augmenter(data_cfg)
    if overfit:
        val = full_train.subset(train_ids)
        val_ann = paths.train_ann
    else:
        val = _validation_images(paths, data_cfg, train_cfg, budget)
        if val.categories.category_ids != full_train.categories.category_ids:
            raise DatasetError(
                f"{paths.val_ann} and {paths.train_ann} define different categories "
                f"({val.categories.category_ids} vs {full_train.categories.category_ids})"
            )
        val_ann = paths.val_ann
    log.info("Data: %d training images, %d evaluation images, %d classes",
             len(train), len(val), len(full_train.categories))
    class_names = list(full_train.categories.names)
    return DataBundle(train, val, val_ann, class_names, _repeat_factors(train, data_cfg, overfit, class_names))


def _repeat_factors(train: CocoDetectionDataset, data_cfg: DataConfig, overfit: bool,
                    class_names: list[str]) -> RepeatFactors | None:
    """The factors of the images training uses (after subset and budget), when data.sampler asks for them."""
    if data_cfg.sampler != SamplerName.repeat_factor:
        return None
    if overfit:
        log.info("data.sampler=repeat_factor is off in overfit mode: every image once per epoch, in order")
        return None
    factors = repeat_factors([train.labels_of(i) for i in range(len(train))], data_cfg.repeat_threshold)
    repeated = ", ".join(f"{class_names[label]} x{r:.2f} (in {100 * factors.image_fraction[label]:.2g}% of "
                         f"the images)" for label, r in factors.most_repeated())
    log.info("Repeat-factor sampling (data.repeat_threshold=%g): about %d samples per epoch from %d images; "
             "most repeated: %s", factors.threshold, factors.expected_epoch_length, len(train),
             repeated or "none (no class is in fewer than that fraction of the images)")
    return factors


def _validation_images(paths: SplitPaths, data_cfg: DataConfig, train_cfg: TrainingConfig,
                       budget: BudgetConfig) -> CocoDetectionDataset:
    full_val = CocoDetectionDataset(paths.val_images, paths.val_ann, default_size=data_cfg.eval_size)
    limit = capped(train_cfg.val_subset_size, budget.max_val_images)
    return full_val if limit is None else full_val.subset(full_val.image_ids[:limit])


def build_evaluation_data(data_cfg: DataConfig, train_cfg: TrainingConfig, budget: BudgetConfig) -> DataBundle:
    """The images a run with this config scores, the same ones training evaluates on (the
    training images themselves in overfit mode). `train` is None unless overfit needs it."""
    if train_cfg.overfit:
        return build_data(data_cfg, train_cfg, budget)
    paths = prepare_dataset(data_cfg)
    val = _validation_images(paths, data_cfg, train_cfg, budget)
    log.info("Data: %d evaluation images, %d classes", len(val), len(val.categories))
    return DataBundle(None, val, paths.val_ann, list(val.categories.names))


def build_augmenter(data_cfg: DataConfig) -> Augmenter | None:
    """The training augmentation of `data.augment`; None when it changes nothing."""
    settings = data_cfg.augment
    if not (settings.hflip_prob or settings.scales or settings.crop.prob or settings.jitter.prob
            or settings.tile.size):
        return None
    return Augmenter(settings, reference_size=data_cfg.image_size, max_size_ratio=data_cfg.max_size_ratio)


def training_sampler(num_images: int, train_cfg: TrainingConfig, size_for_epoch: Callable[[int], int],
                     dist: DistContext, factors: RepeatFactors | None = None) -> EpochBatchSampler:
    return EpochBatchSampler(
        num_images, train_cfg.batch_size, shuffle=not train_cfg.overfit, seed=train_cfg.seed,
        size_for_epoch=size_for_epoch, rank=dist.rank, world_size=dist.world_size,
        repeat_factors=None if factors is None else factors.per_image,
    )


def evaluation_sampler(num_images: int, batch_size: int, eval_size: int, dist: DistContext) -> EpochBatchSampler:
    # Evaluation shards are not padded: a repeated image would count twice in COCOeval.
    return EpochBatchSampler(
        num_images, batch_size, shuffle=False, seed=0, size_for_epoch=lambda epoch: eval_size,
        rank=dist.rank, world_size=dist.world_size, pad=False,
    )


def make_loader(dataset, batch_sampler, collator: DetrCollator, data_cfg: DataConfig, seed: int,
                device: torch.device) -> DataLoader:
    workers = data_cfg.num_workers
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collator,
        num_workers=workers,
        persistent_workers=workers > 0 and data_cfg.persistent_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # Worker seeds come from this generator, not the global RNG, so creating an
        # iterator never shifts the training RNG stream (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
