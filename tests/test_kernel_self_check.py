"""The Triton kernel is safe by default: its inputs are checked on the host before launch,
and `auto` uses it only after it agreed with the PyTorch path on the device and dtype.

The self-check tests run where the kernel runs: on a GPU when there is one, else on the
CPU in Triton's interpreter (conftest switches it on before anything imports Triton).
`auto` never picks Triton on CPU, so there the fallback tests let it consider the CPU
(`auto_considers`) to exercise the decision exactly as it runs on CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch

from detr_train.errors import ConfigError
from detr_train.modeling.kernels import selection, self_check
from detr_train.modeling.kernels.deformable_attention import (
    TritonMultiScaleDeformableAttention,
    check_inputs,
    ms_deform_attn,
)

pytestmark = pytest.mark.kernel

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# How the self-check names the device it ran on (`cuda` becomes `cuda:0`).
CHECKED = str(selection._indexed(DEVICE))
SHAPES = [(4, 6), (2, 3), (1, 1)]  # 24 + 6 + 1 = 31 keys
BATCH, QUERIES, HEADS, LEVELS, POINTS, HEAD_DIM = 2, 5, 2, 3, 4, 8


def _inputs(device: torch.device | str = CPU, **overrides) -> dict:
    """Consistent kernel inputs; `overrides` replaces one of them with an inconsistent shape."""
    keys = sum(h * w for h, w in SHAPES)
    inputs = {
        "value": torch.randn(BATCH, keys, HEADS, HEAD_DIM, device=device),
        "spatial_shapes": torch.tensor(SHAPES, device=device),
        "spatial_shapes_list": SHAPES,
        "level_start_index": torch.tensor([0, 24, 30], device=device),
        "sampling_locations": torch.rand(BATCH, QUERIES, HEADS, LEVELS, POINTS, 2, device=device),
        "attention_weights": torch.rand(BATCH, QUERIES, HEADS, LEVELS, POINTS, device=device),
    }
    return {**inputs, **overrides}


def _empty(*shape, dtype=torch.float32) -> torch.Tensor:
    # Meta tensors have shapes but no values: a check that read a value would fail on them.
    return torch.empty(*shape, dtype=dtype, device="meta")


BAD_INPUTS = {
    "value shorter than the levels": ({"value": _empty(BATCH, 30, HEADS, HEAD_DIM)}, r"value has 30 keys .* hold 31"),
    "value longer than the levels": ({"value": _empty(BATCH, 32, HEADS, HEAD_DIM)}, r"value has 32 keys .* hold 31"),
    "value not 4-d": ({"value": _empty(BATCH, 31, HEADS * HEAD_DIM)}, r"value must be \(batch, keys, heads"),
    "spatial_shapes with a level too few": (
        {"spatial_shapes": _empty(2, 2, dtype=torch.long)}, r"spatial_shapes must be \(3 levels, 2\).*\(2, 2\)"),
    "level_start_index with a level too many": (
        {"level_start_index": _empty(4, dtype=torch.long)}, r"level_start_index must have one start per level.*\(4,\)"),
    "locations with other heads": (
        {"sampling_locations": _empty(BATCH, QUERIES, 3, LEVELS, POINTS, 2)}, r"heads=2.*\(2, 5, 3, 3, 4, 2\)"),
    "locations with other levels": (
        {"sampling_locations": _empty(BATCH, QUERIES, HEADS, 2, POINTS, 2)}, r"levels=3.*\(2, 5, 2, 2, 4, 2\)"),
    "locations of another batch": (
        {"sampling_locations": _empty(3, QUERIES, HEADS, LEVELS, POINTS, 2)}, r"batch=2.*\(3, 5, 2, 3, 4, 2\)"),
    "weights with other points": (
        {"attention_weights": _empty(BATCH, QUERIES, HEADS, LEVELS, 3)},
        r"attention_weights \(2, 5, 2, 3, 3\).* vs sampling_locations \(2, 5, 2, 3, 4, 2\)"),
    "weights with other queries": (
        {"attention_weights": _empty(BATCH, 6, HEADS, LEVELS, POINTS)},
        r"attention_weights \(2, 6, 2, 3, 4\).* vs sampling_locations \(2, 5, 2, 3, 4, 2\)"),
    "integer locations": (
        {"sampling_locations": _empty(BATCH, QUERIES, HEADS, LEVELS, POINTS, 2, dtype=torch.long)},
        "sampling_locations must be floating point"),
    "float level starts": ({"level_start_index": _empty(3)}, "level_start_index must be an integer tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_inconsistent_inputs_raise_naming_both_shapes(case):
    overrides, message = BAD_INPUTS[case]
    inputs = {name: tensor.to("meta") if isinstance(tensor, torch.Tensor) else tensor
              for name, tensor in _inputs(**overrides).items()}
    with pytest.raises(ValueError, match=message):
        check_inputs(*inputs.values())


def test_consistent_inputs_pass_without_reading_a_value():
    inputs = {name: tensor.to("meta") if isinstance(tensor, torch.Tensor) else tensor
              for name, tensor in _inputs().items()}
    check_inputs(*inputs.values())  # on meta tensors, any value read would raise


def test_inputs_on_two_devices_are_refused():
    inputs = _inputs()
    inputs["attention_weights"] = inputs["attention_weights"].to("meta")
    with pytest.raises(ValueError, match=r"attention_weights .* on meta is not on value's device: value .* on cpu"):
        check_inputs(*inputs.values())


def test_a_short_value_is_refused_before_any_launch(monkeypatch):
    """The case that read out of bounds (signal 11 under the interpreter) now raises first."""
    def no_launch():
        raise AssertionError("the kernel was launched")

    monkeypatch.setattr("detr_train.modeling.kernels.deformable_attention._kernels", no_launch)
    inputs = _inputs(value=torch.randn(BATCH, 29, HEADS, HEAD_DIM))
    with pytest.raises(ValueError, match="value has 29 keys"):
        TritonMultiScaleDeformableAttention()(
            inputs["value"], inputs["spatial_shapes"], SHAPES, inputs["level_start_index"],
            inputs["sampling_locations"], inputs["attention_weights"], 64)


@pytest.fixture
def fresh_self_check(monkeypatch):
    """A process that has not checked the kernel yet, and whose `auto` considers the CPU."""
    self_check.kernel_problem.cache_clear()
    monkeypatch.setattr(selection, "_warned", set())
    monkeypatch.setattr(selection, "auto_considers", lambda device: True)
    yield
    self_check.kernel_problem.cache_clear()


def _attention_model() -> torch.nn.Module:
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrConfig,
        DeformableDetrMultiscaleDeformableAttention,
    )

    config = DeformableDetrConfig(d_model=16, encoder_attention_heads=2, num_feature_levels=2, encoder_n_points=2)
    return torch.nn.Sequential(DeformableDetrMultiscaleDeformableAttention(config, num_heads=2, n_points=2))


def _kinds(model) -> list[str]:
    return ["triton" if isinstance(m.attn, TritonMultiScaleDeformableAttention) else "pytorch"
            for m in model.modules() if hasattr(m, "attn")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_real_kernel_passes_its_self_check(fresh_self_check, dtype):
    assert self_check.kernel_problem(selection._indexed(DEVICE), dtype) is None
    model = _attention_model()
    assert selection.install_attention_kernel(model, "auto", DEVICE, (torch.float32, dtype)) == "triton"
    assert _kinds(model) == ["triton"]


def _raising_kernel(*args):
    raise RuntimeError("PassManager::run failed\nfull compiler log follows")


def _wrong_kernel(value, *args):
    output = ms_deform_attn(value, *args)
    return output * 1.001  # off by 0.1%: beyond every tolerance, yet a plausible-looking output


FAULTY_KERNELS = {
    "raises": (_raising_kernel, f"the kernel failed on {CHECKED} in torch.float32: RuntimeError: PassManager::run failed"),
    "wrong values": (_wrong_kernel, f"the kernel disagrees with the PyTorch path on {CHECKED} in torch.float32: output"),
}


@pytest.mark.parametrize("fault", list(FAULTY_KERNELS))
def test_a_faulty_kernel_falls_back_under_auto_with_one_warning(fresh_self_check, monkeypatch, caplog, fault):
    kernel, reason = FAULTY_KERNELS[fault]
    monkeypatch.setattr(self_check, "ms_deform_attn", kernel)
    model = _attention_model()
    with caplog.at_level(logging.WARNING, logger="detr_train.modeling.kernels.selection"):
        assert selection.install_attention_kernel(model, "auto", DEVICE) == "pytorch"
        assert selection.install_attention_kernel(_attention_model(), "auto", DEVICE) == "pytorch"
    assert _kinds(model) == ["pytorch"]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and reason in warnings[0] and "\n" not in warnings[0], warnings


@pytest.mark.parametrize("fault", list(FAULTY_KERNELS))
def test_a_faulty_kernel_is_a_one_line_error_under_triton(fresh_self_check, monkeypatch, fault):
    kernel, reason = FAULTY_KERNELS[fault]
    monkeypatch.setattr(self_check, "ms_deform_attn", kernel)
    with pytest.raises(ConfigError) as raised:
        selection.install_attention_kernel(_attention_model(), "triton", DEVICE)
    message = str(raised.value)
    assert message.startswith(f"model.attention_kernel=triton cannot run on {DEVICE}") and reason in message
    assert "\n" not in message


def test_a_kernel_wrong_only_in_half_precision_falls_back(fresh_self_check, monkeypatch):
    def wrong_in_bf16(value, *args):
        output = ms_deform_attn(value, *args)
        return output if value.dtype == torch.float32 else output * 1.05

    monkeypatch.setattr(self_check, "ms_deform_attn", wrong_in_bf16)
    assert selection.install_attention_kernel(_attention_model(), "auto", DEVICE, (torch.float32,)) == "triton"
    assert selection.install_attention_kernel(_attention_model(), "auto", DEVICE,
                                              (torch.float32, torch.bfloat16)) == "pytorch"


def test_the_check_runs_once_per_device_and_dtype(fresh_self_check, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[0].dtype)
        return ms_deform_attn(*args)

    monkeypatch.setattr(self_check, "ms_deform_attn", counted)
    for _ in range(3):
        selection.install_attention_kernel(_attention_model(), "auto", DEVICE)
    assert calls == [torch.float32]
