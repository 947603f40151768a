"""Mixed precision plumbing and the non-finite loss guard."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from detr_train.checkpointing.state import TrainState
from detr_train.config.schema import ScheduleConfig, ScheduleName
from detr_train.modeling.build import build_model
from detr_train.modeling.precision import resolve_precision
from detr_train.training.loop import EpochPlan, NonFiniteGuard, NonFiniteLossError, TrainStep, train_one_epoch
from detr_train.training.optim import LRSchedule
from tests.conftest import compose_config


def test_amp_on_cpu_falls_back_to_fp32_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        precision = resolve_precision(True, "float16", torch.device("cpu"))
    assert not precision.enabled and not precision.scaler.is_enabled()
    assert sum("needs CUDA" in r.getMessage() for r in caplog.records) == 1


def test_bad_amp_dtype_is_rejected():
    with pytest.raises(ValueError, match="training.amp_dtype"):
        resolve_precision(True, "float8", torch.device("cpu"))


def test_deformable_attention_projections_run_in_half_precision_and_sampling_accumulates_in_fp32():
    """No fp32 island: under autocast the attention's linear layers run in bf16, the fused
    kernel takes the bf16 values and sums in fp32, and the output stays close to fp32's."""
    from detr_train.modeling.kernels.selection import install_attention_kernel

    torch.manual_seed(0)
    # The plain variant: two-stage picks its queries by a top-k over proposal scores, which
    # bf16 rounding may reorder, and then the boxes cannot be compared one for one.
    model_cfg = compose_config(["model.two_stage=false", "model.with_box_refine=false"]).model
    model = build_model(model_cfg, ["a", "b", "c"]).eval()
    install_attention_kernel(model, "triton", torch.device("cpu"))  # Triton's interpreter here
    seen = {"value_proj": [], "kernel_in": []}
    for module in model.modules():
        if type(module).__name__ == "DeformableDetrMultiscaleDeformableAttention":
            module.value_proj.register_forward_hook(lambda m, args, out: seen["value_proj"].append(out.dtype))
            module.attn.register_forward_pre_hook(lambda m, args: seen["kernel_in"].append(args[0].dtype))
    pixels = torch.randn(1, 3, 64, 64)
    mask = torch.ones(1, 64, 64, dtype=torch.long)
    with torch.no_grad():
        reference = model(pixel_values=pixels, pixel_mask=mask).pred_boxes
        # CPU autocast in bf16 stands in for CUDA autocast.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(pixel_values=pixels, pixel_mask=mask).pred_boxes
    assert seen["value_proj"][-3:] == [torch.bfloat16] * 3 and seen["kernel_in"][-3:] == [torch.bfloat16] * 3
    assert torch.allclose(half.float(), reference, atol=0.05)


class _NaNAfter(torch.nn.Module):
    """A stand-in detector whose loss turns NaN from call `bad_from` on."""

    def __init__(self, bad_from: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.calls, self.bad_from = 0, bad_from

    def forward(self, pixel_values, pixel_mask, labels):
        self.calls += 1
        loss = (self.weight * 2.0).sum()
        if self.calls >= self.bad_from:
            loss = loss * float("nan")
        return types.SimpleNamespace(loss=loss, loss_dict={"loss_ce": loss})


def _batches(n):
    return [{"pixel_values": torch.zeros(1, 3, 4, 4), "pixel_mask": torch.ones(1, 4, 4), "labels": [{}]}] * n


def _train(model, nonfinite, max_steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    constant = ScheduleConfig(name=ScheduleName.constant, warmup_steps=0, step_epochs=[], gamma=0.1, min_lr_ratio=0.0)
    step = TrainStep(model, optimizer, LRSchedule(optimizer, constant, total_steps=4, steps_per_epoch=4),
                     resolve_precision(False, "bfloat16", torch.device("cpu")), grad_clip=1.0,
                     nonfinite=NonFiniteGuard(nonfinite, max_steps), device=torch.device("cpu"))
    state = TrainState()
    train_one_epoch(step, _batches(4), state, EpochPlan(epoch=1, total_batches=4), lambda: False)
    return state.meter


def test_nonfinite_loss_is_skipped_without_touching_the_weights(caplog):
    model = _NaNAfter(bad_from=3)
    with caplog.at_level(logging.WARNING):
        meter = _train(model, "skip")
    assert meter.skipped == 2 and meter.count == 2
    assert torch.isfinite(model.weight).all()
    assert model.weight.item() == pytest.approx(1.0 - 2 * 0.1 * 1.0)  # two clipped SGD steps
    assert any("non-finite loss" in r.getMessage() for r in caplog.records)


def test_nonfinite_loss_stops_when_configured():
    model = _NaNAfter(bad_from=2)
    with pytest.raises(NonFiniteLossError, match="non-finite loss") as info:
        _train(model, "stop")
    assert "training.nonfinite" in info.value.hint
    assert torch.isfinite(model.weight).all()


def test_too_many_nonfinite_steps_in_a_row_stop_anyway():
    with pytest.raises(NonFiniteLossError, match="in a row"):
        _train(_NaNAfter(bad_from=1), "skip", max_steps=2)
