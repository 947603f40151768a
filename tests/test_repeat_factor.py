"""Repeat-factor sampling (data.sampler=repeat_factor): the LVIS factors, what an epoch
draws, and that an epoch stays a pure function of (seed, epoch) through resumes and DDP."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from detr_train.config.checks import check_config
from detr_train.config.schema import BudgetConfig, SamplerName
from detr_train.data.build import build_data, training_sampler
from detr_train.data.repeat_factor import repeat_factors
from detr_train.data.sampling import EpochBatchSampler
from detr_train.distributed.launch import DistContext
from detr_train.errors import ConfigError
from tests.conftest import compose_config

# Ten images: "car" in nine, "rider" in two, "train" in one (together with a rider), one empty.
HAND_MADE = [[0, 0], [0], [0], [0], [0], [0], [0, 1], [0, 1, 2, 0], [0], []]


def test_factors_equal_the_formula_on_a_hand_made_dataset():
    factors = repeat_factors(HAND_MADE, threshold=0.5)
    assert factors.image_fraction == {0: 0.9, 1: 0.2, 2: 0.1}
    r_car, r_rider, r_train = 1.0, math.sqrt(0.5 / 0.2), math.sqrt(0.5 / 0.1)  # sqrt(0.5 / 0.9) < 1
    assert factors.per_class == pytest.approx({0: r_car, 1: r_rider, 2: r_train}, rel=1e-12)
    # An image takes its rarest class's factor; an empty image 1.
    assert factors.per_image == pytest.approx([1, 1, 1, 1, 1, 1, r_rider, r_train, 1, 1], rel=1e-12)
    assert factors.expected_epoch_length == round(8 + r_rider + r_train)
    assert factors.most_repeated() == [(2, pytest.approx(r_train)), (1, pytest.approx(r_rider))]
    assert repeat_factors(HAND_MADE, threshold=0.05).per_image == (1.0,) * 10  # nothing rarer than 5%


def _draws(factors, epochs: range, **sampler_args) -> list[list[int]]:
    sampler = EpochBatchSampler(len(factors), 8, shuffle=True, seed=3, size_for_epoch=lambda e: 64,
                                repeat_factors=factors, **sampler_args)
    orders = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        orders.append([request.index for batch in sampler for request in batch])
    return orders


def test_a_rare_class_share_of_the_sampled_images_rises_as_predicted():
    # 1000 images: a rare class in 5 of them (f = 0.005), a common one in the rest.
    classes = [[1]] * 5 + [[0]] * 995
    factors = repeat_factors(classes, threshold=0.1).per_image
    r = math.sqrt(0.1 / 0.005)  # 4.47: each rare image 4 or 5 times an epoch
    epochs = _draws(factors, range(1, 201))
    for order in epochs:
        counts = Counter(order)
        assert all(counts[i] in (4, 5) for i in range(5)) and all(counts[i] == 1 for i in range(5, 1000))
    rare = sum(index < 5 for order in epochs for index in order)
    total = sum(len(order) for order in epochs)
    predicted = 5 * r / (995 + 5 * r)  # 2.2%, from 0.5% without repeats
    # Binomial spread of the rounding draws: 5 images x 200 epochs, each frac(r) (1 - frac(r)).
    spread = math.sqrt(1000 * (r % 1) * (1 - r % 1)) / total
    assert abs(rare / total - predicted) < 4 * spread
    assert len({len(order) for order in epochs}) > 1  # the epoch's length is drawn too


def test_an_epoch_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch_exactly():
    factors = repeat_factors(HAND_MADE, threshold=0.5).per_image
    sampler = EpochBatchSampler(10, 3, shuffle=True, seed=7, size_for_epoch=lambda e: 100 + e, repeat_factors=factors)
    sampler.set_epoch(4)
    full = list(sampler)
    assert len(sampler) == len(full) == sampler.batches_per_epoch()
    # A new process (a resumed run) at batch 2 of epoch 4 sees the uninterrupted epoch's tail.
    resumed = EpochBatchSampler(10, 3, shuffle=True, seed=7, size_for_epoch=lambda e: 100 + e,
                                repeat_factors=factors)
    resumed.set_epoch(4, start_batch=2)
    assert list(resumed) == full[2:] and len(resumed) == len(full) - 2
    # ... whichever epochs this process went through before.
    sampler.set_epoch(9)
    list(sampler)
    sampler.set_epoch(4, start_batch=2)
    assert list(sampler) == full[2:]


@pytest.mark.parametrize("world_size,batch_size", [(2, 3), (3, 2), (4, 5)])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(world_size, batch_size):
    factors = repeat_factors(HAND_MADE, threshold=0.5).per_image
    whole = EpochBatchSampler(10, batch_size, shuffle=True, seed=1, size_for_epoch=lambda e: 64,
                              repeat_factors=factors)
    for epoch in (1, 2, 3):
        whole.set_epoch(epoch)
        order = [r.index for batch in whole for r in batch]
        shards = []
        for rank in range(world_size):
            shard = EpochBatchSampler(10, batch_size, shuffle=True, seed=1, size_for_epoch=lambda e: 64,
                                      repeat_factors=factors, rank=rank, world_size=world_size)
            shard.set_epoch(epoch)
            shards.append([r.index for batch in shard for r in batch])
            assert len(shard) == whole_batches(len(order), world_size, batch_size)
        # Position p of the epoch goes to rank p mod world_size; the last round is padded from its start.
        padded = (order * 2)[: len(shards[0]) * world_size]
        assert [shards[p % world_size][p // world_size] for p in range(len(padded))] == padded


def whole_batches(samples: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(samples / world_size) / batch_size)


def _write_dataset(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for image_id, labels in enumerate(HAND_MADE, 1):
        Image.new("RGB", (16, 16)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 16, "height": 16})
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                         "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0} for label in labels]
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "rider"}, {"id": 3, "name": "train"}]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))


def _config(root: Path, *overrides: str):
    return compose_config(["data=coco", f"data.root={root}", "data.train_images=images", "data.val_images=images",
                           "data.train_ann=ann.json", "data.val_ann=ann.json", "data.sampler=repeat_factor",
                           "data.repeat_threshold=0.5", *overrides])


def test_the_run_samples_its_own_images_by_their_factors_after_subset_and_budget(tmp_path):
    _write_dataset(tmp_path)
    cfg = _config(tmp_path)
    bundle = build_data(cfg.data, cfg.training, BudgetConfig())
    assert bundle.repeat_factors.per_image == repeat_factors(HAND_MADE, 0.5).per_image
    # A subset (or a budget's cap) is the training set the fractions are taken over.
    subset = _config(tmp_path, "training.subset_size=5", "training.subset_seed=2")
    small = build_data(subset.data, subset.training, BudgetConfig(max_train_images=4))
    classes = [[bundle.train.categories.label(a["category_id"]) for a in small.train.annotations_of(i)]
               for i in range(len(small.train))]
    assert len(small.train) == 4
    assert small.repeat_factors.per_image == repeat_factors(classes, 0.5).per_image
    sampler = training_sampler(len(small.train), subset.training, lambda e: 64, DistContext(0, 1, 0),
                               small.repeat_factors)
    assert sampler.repeat_factors == list(small.repeat_factors.per_image)
    # Uniform (the default) and overfit mode sample every image once.
    assert build_data(cfg.data, _config(tmp_path, "training.overfit=true").training, BudgetConfig()).repeat_factors \
        is None
    assert compose_config([]).data.sampler == SamplerName.uniform
    assert compose_config(["data=bdd100k", "data.root=/x"]).data.sampler == SamplerName.repeat_factor


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_a_threshold_outside_0_1_is_a_config_error_naming_the_key(value):
    cfg = compose_config(["data=coco", "data.root=/x", f"data.repeat_threshold={value}"])
    with pytest.raises(ConfigError, match=rf"data.repeat_threshold must be in \(0, 1\].*got {value}"):
        check_config(cfg)


@pytest.mark.slow
def test_a_repeat_factor_run_counts_its_own_epochs_and_resumes_mid_epoch(small_run_overrides, tmp_path, monkeypatch):
    """The Trainer side (the sampler's resume is exact, above): each epoch is as long as its
    own draw, the steps add up over a resume, and each record's LR is its first step's."""
    from detr_train.checkpointing.plan import Plan, plan
    from tests.conftest import make_trainer
    from tests.test_resume import _Crash, _records

    overrides = small_run_overrides + [
        "data.sampler=repeat_factor", "data.repeat_threshold=1.0", "training.subset_size=8", "training.epochs=2",
        "training.batch_size=2", "training.seed=0", "training.val_subset_size=2",
        "training.checkpoint.every_n_steps=1", "training.schedule.name=cosine"]
    run_dir = tmp_path / "run"
    trainer = make_trainer(Plan(compose_config(overrides), run_dir))
    steps = []  # per epoch, from the sampler's own draw
    for epoch in (1, 2):
        trainer.train_sampler.set_epoch(epoch)
        steps.append(trainer.train_sampler.batches_per_epoch())
    assert set(steps) != {trainer.steps_per_epoch}  # seed 0 draws epochs off the expected length
    original_save = trainer.checkpointer.save

    def save_then_crash(**kwargs):
        path = original_save(**kwargs)
        if trainer.state.global_step == steps[0] + 1:  # epoch 2, after its first step
            raise _Crash
        return path

    monkeypatch.setattr(trainer.checkpointer, "save", save_then_crash)
    with pytest.raises(_Crash):
        trainer.fit()
    report = (run_dir / "data_report.json").read_text()
    resumed = make_trainer(plan(compose_config(overrides + [f"training.resume={run_dir}"]), run_dir))
    resumed.fit()
    assert resumed.state.global_step == sum(steps)
    assert [(r["global_step"], r["lr"]) for r in _records(run_dir)] == [
        (steps[0], resumed.schedule.lr_at(0)), (sum(steps), resumed.schedule.lr_at(steps[0]))]
    assert (run_dir / "data_report.json").read_text() == report
    assert json.loads(report)["repeat_factors"]["expected_epoch_length"] == \
        resumed.data.repeat_factors.expected_epoch_length


def test_a_checkpoint_from_before_the_sampler_keys_resumes_uniform_even_under_the_bdd_preset(tmp_path):
    from omegaconf import OmegaConf

    from detr_train.checkpointing.checkpointer import Found
    from detr_train.checkpointing.format import KEY_CONFIG_YAML
    from detr_train.checkpointing.plan import reconcile_config

    today = compose_config(["data=bdd100k", "data.root=/x"])
    saved = OmegaConf.to_container(today, resolve=True, enum_to_str=True)
    del saved["data"]["sampler"], saved["data"]["repeat_threshold"]
    resumed = reconcile_config(Found(tmp_path / "last.pt", {KEY_CONFIG_YAML: OmegaConf.to_yaml(saved)}), today)
    assert resumed.data.sampler == SamplerName.uniform and resumed.data.repeat_threshold == 0.001
