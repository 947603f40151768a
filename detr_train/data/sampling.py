"""Which images an epoch sees, in which order, at which size.

Everything here is a pure function of (seed, epoch): the order of an epoch does not
depend on how many epochs ran before in this process, which is what makes a resumed
run (even one resumed mid-epoch, via `start_batch`) see the same batches as an
uninterrupted one.

With repeat factors (`data.sampler=repeat_factor`, see `data.repeat_factor`) an epoch
first expands the images by their drawn repeats, then shuffles, then shards: so its
length differs from epoch to epoch, and `batches_per_epoch()` is that of the selected epoch.
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from detr_train.data.coco import SampleRequest
from detr_train.data.repeat_factor import expected_length, repeated_indices
from detr_train.data.sources import DatasetError

log = logging.getLogger(__name__)


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
    `repeat_factors` (one per image) make an epoch show image i about r_i times.
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
        repeat_factors: Sequence[float] | None = None,
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
        if repeat_factors is not None and len(repeat_factors) != num_samples:
            raise ValueError(f"{len(repeat_factors)} repeat factors for {num_samples} images")
        self.repeat_factors = None if repeat_factors is None else list(repeat_factors)
        self.epoch = 1
        self.start_batch = 0
        self._order_of_epoch: tuple[int, list[int]] | None = None  # the last epoch's global order, reused

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (1-based) and skip its first `start_batch` batches (mid-epoch resume)."""
        self.epoch = epoch
        self.start_batch = start_batch
        if self.repeat_factors is not None:
            log.info("Epoch %d: %d samples from %d images (repeat-factor sampling), %d batches per process",
                     epoch, len(self._global_order()), self.num_samples, self.batches_per_epoch())

    def _global_order(self) -> list[int]:
        """The epoch's samples in order, before sharding: a pure function of (seed, epoch)."""
        if self._order_of_epoch is not None and self._order_of_epoch[0] == self.epoch:
            return self._order_of_epoch[1]
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.repeat_factors is None:
            indices = torch.arange(self.num_samples)
            order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else indices
        else:
            # Repeats first, shuffle second: copies of an image land anywhere in the epoch.
            indices = repeated_indices(self.repeat_factors, generator)
            order = indices[torch.randperm(len(indices), generator=generator)] if self.shuffle else indices
        self._order_of_epoch = (self.epoch, order.tolist())
        return self._order_of_epoch[1]

    def _epoch_order(self) -> list[int]:
        order = self._global_order()
        if self.world_size > 1:
            if self.pad:
                # Pad so every rank gets the same number of batches (DDP needs lockstep).
                per_rank = -(-len(order) // self.world_size)
                order = (order * 2)[: per_rank * self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def _samples_on_this_rank(self, total: int) -> int:
        if self.pad:
            return -(-total // self.world_size)
        return len(range(self.rank, total, self.world_size))

    def _batches_for(self, total: int) -> int:
        per_rank = self._samples_on_this_rank(total)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def batches_per_epoch(self) -> int:
        """Batches per process in the selected epoch."""
        total = self.num_samples if self.repeat_factors is None else len(self._global_order())
        return self._batches_for(total)

    def expected_batches_per_epoch(self) -> int:
        """Batches per process in an average epoch: with repeat factors, of the expected
        length (the sum of the factors, rounded); otherwise every epoch's."""
        if self.repeat_factors is None:
            return self._batches_for(self.num_samples)
        return self._batches_for(expected_length(self.repeat_factors))

    def __iter__(self) -> Iterator[list[SampleRequest]]:
        order = self._epoch_order()
        size = self.size_for_epoch(self.epoch)
        for batch_index in range(self.start_batch, self.batches_per_epoch()):
            chunk = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            yield [SampleRequest(i, size, self.epoch) for i in chunk]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)
