"""Which images an epoch sees, in which order, at which size.

Everything here is a pure function of (seed, epoch): the order of an epoch does not
depend on how many epochs ran before in this process, which is what makes a resumed
run (even one resumed mid-epoch, via `start_batch`) see the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from detr_train.data.coco import SampleRequest
from detr_train.data.sources import DatasetError


def select_training_images(
    image_ids: Sequence[int],
    *,
    subset_size: int | None,
    subset_seed: int,
    overfit: bool,
    overfit_size: int,
    budget_cap: int | None = None,
    source: str = "training set",
) -> list[int]:
    """The training image ids after overfit / subset / budget selection."""
    ids = list(image_ids)
    if overfit:
        if overfit_size < 1:
            raise DatasetError(f"training.overfit_size must be >= 1, got {overfit_size}")
        if overfit_size > len(ids):
            raise DatasetError(
                f"training.overfit_size={overfit_size} is larger than the {source} ({len(ids)} images)"
            )
        return ids[:overfit_size]
    if subset_size is not None:
        if subset_size < 1:
            raise DatasetError(f"training.subset_size must be >= 1, got {subset_size}")
        if subset_size > len(ids):
            raise DatasetError(
                f"training.subset_size={subset_size} is larger than the {source} ({len(ids)} images)"
            )
        ids = sorted(random.Random(subset_seed).sample(ids, subset_size))
    if budget_cap is not None and budget_cap < len(ids):
        # A budget is a cap, not a demand: draw it the same reproducible way.
        ids = sorted(random.Random(subset_seed).sample(ids, budget_cap))
    return ids


class EpochBatchSampler(Sampler[list[SampleRequest]]):
    """Yields batches of `SampleRequest`s: index, the epoch's image size, the epoch.

    The sampler runs in the main process, so the size it attaches reaches every
    DataLoader worker, persistent or not, with the very next batch.
    `rank`/`world_size` shard each epoch's order for distributed training.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        size_for_epoch: Callable[[int], int],
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"training.batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.size_for_epoch = size_for_epoch
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 1
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (1-based) and skip its first `start_batch` batches (mid-epoch resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.num_samples))
        else:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.world_size > 1:
            if self.pad:
                # Pad so every rank gets the same number of batches (DDP needs lockstep).
                per_rank = -(-len(order) // self.world_size)
                order = (order * 2)[: per_rank * self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def _samples_on_this_rank(self) -> int:
        if self.pad:
            return -(-self.num_samples // self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def batches_per_epoch(self) -> int:
        per_rank = self._samples_on_this_rank()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[SampleRequest]]:
        order = self._epoch_order()
        size = self.size_for_epoch(self.epoch)
        for batch_index in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            yield [SampleRequest(i, size, self.epoch) for i in chunk]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)
