"""Gradient accumulation: K micro-batches of B make the same optimiser step as one batch of K x B."""

from __future__ import annotations

import copy

import pytest
import torch

from detr_train.checkpointing.state import TrainState
from detr_train.config.schema import ScheduleConfig, ScheduleName
from detr_train.modeling.build import build_model
from detr_train.modeling.fast_paths import apply_fast_paths
from detr_train.modeling.precision import resolve_precision
from detr_train.training.loop import NonFiniteGuard, TrainStep
from detr_train.training.optim import LRSchedule
from tests.conftest import compose_config

CLASSES = ["a", "b", "c"]


def _batch(images: int, generator: torch.Generator, boxes_per_image=(2, 0, 3, 1)) -> dict:
    labels = []
    for index in range(images):
        count = boxes_per_image[index % len(boxes_per_image)]
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.2 + 0.05
        labels.append({"class_labels": torch.randint(0, len(CLASSES), (count,), generator=generator),
                       "boxes": torch.cat([centres, sizes], dim=1)})
    return {"pixel_values": torch.randn(images, 3, 64, 64, generator=generator),
            "pixel_mask": torch.ones(images, 64, 64, dtype=torch.long), "labels": labels}


def _merged(batches: list[dict]) -> dict:
    return {"pixel_values": torch.cat([b["pixel_values"] for b in batches]),
            "pixel_mask": torch.cat([b["pixel_mask"] for b in batches]),
            "labels": [label for b in batches for label in b["labels"]]}


class _GradientRecorder(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of its last step."""

    def step(self, closure=None):
        self.gradients = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def _step_for(model, *model_overrides: str) -> TrainStep:
    cfg = compose_config(list(model_overrides))
    paths = apply_fast_paths(model, cfg.model, cfg.training, torch.device("cpu"))
    optimizer = _GradientRecorder(model.parameters(), lr=0.1)
    constant = ScheduleConfig(name=ScheduleName.constant, warmup_steps=0, step_epochs=[], gamma=0.1, min_lr_ratio=0.0)
    return TrainStep(model, optimizer, LRSchedule(optimizer, constant, total_steps=1, steps_per_epoch=1),
                     resolve_precision(False, "bfloat16", torch.device("cpu")), grad_clip=0.0,
                     nonfinite=NonFiniteGuard(), device=torch.device("cpu"), criterion=paths.criterion)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("model_overrides", [
    (),
    ("model.with_box_refine=true", "model.two_stage=true"),
], ids=["plain", "two-stage"])
def test_two_micro_batches_step_like_one_batch_twice_as_large(model_overrides, dtype):
    generator = torch.Generator().manual_seed(0)
    micro = [_batch(2, generator), _batch(2, generator)]
    torch.manual_seed(0)
    model = build_model(compose_config(list(model_overrides)).model, CLASSES).to(dtype)
    for batch in micro:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        for label in batch["labels"]:
            label["boxes"] = label["boxes"].to(dtype)
    big_model = copy.deepcopy(model)
    accumulated = _step_for(model, *model_overrides)
    one_batch = _step_for(big_model, *model_overrides)

    losses_k2 = accumulated(micro, TrainState())
    losses_k1 = one_batch([_merged(micro)], TrainState())

    assert set(losses_k2) == set(losses_k1)
    for key in losses_k1:
        assert losses_k2[key] == pytest.approx(losses_k1[key], rel=1e-6, abs=1e-6), key
    if model_overrides:
        assert "loss_ce_enc" in losses_k1  # the two-stage encoder loss is part of the step
    names = [name for name, _ in model.named_parameters()]
    for name, g_k2, g_k1 in zip(names, accumulated.optimizer.gradients, one_batch.optimizer.gradients):
        # In float64 this checks the arithmetic. In float32 the sums taken in another order
        # round differently: the first convolution adds up ~16k products per weight, and the
        # default BiT backbone's weight standardisation turns that into ~1e-5 relative.
        if dtype == torch.float64:
            assert torch.allclose(g_k2, g_k1, rtol=1e-6, atol=1e-9), name
        else:
            assert (g_k2 - g_k1).norm() <= 1e-4 * g_k1.norm() + 1e-6, (name, float((g_k2 - g_k1).norm() / g_k1.norm()))
    assert sum(g.abs().max() > 0 for g in one_batch.optimizer.gradients) > 0.9 * len(names)  # a real step


def test_the_step_reads_the_device_once_for_its_loss_components():
    """The loss components of all micro-batches come back together, and decide the skip."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = build_model(compose_config().model, CLASSES)
    step = _step_for(model)
    state = TrainState()
    losses = step([_batch(2, generator), _batch(2, generator), _batch(1, generator)], state)
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou"} <= set(losses)
    assert state.meter.count == 1 and state.meter.sums["loss"] == losses["loss"]
