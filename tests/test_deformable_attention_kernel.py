"""The Triton deformable attention kernels against transformers' PyTorch implementation.

Without CUDA the kernels run in Triton's CPU interpreter. Triton 3.8 reads
TRITON_INTERPRET (via `triton.knobs`, afresh on every access) whenever
`@triton.jit` decorates a function. Our kernels are decorated on first launch,
but Triton decorates its own library (tl.sum, tl.zeros, ...) at `import triton`,
which torch._dynamo, and so transformers, trigger; `import torch` alone does not.
So the variable is set here, before transformers is imported, and stays set:
once Triton's library is built for the interpreter nothing else can run Triton
on this machine anyway. When an earlier test module has already imported
transformers (and so Triton, for the GPU compiler), this process can no longer
interpret the kernels: the tests then run in a fresh process instead.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch


def _triton_built_for_the_compiler() -> bool:
    triton = sys.modules.get("triton")
    return triton is not None and isinstance(triton.language.sum, triton.runtime.JITFunction)


NEEDS_FRESH_PROCESS = not torch.cuda.is_available() and _triton_built_for_the_compiler()
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

from detr_train.modeling.kernels.deformable_attention import (
    TritonMultiScaleDeformableAttention,
    ms_deform_attn,
    triton_unavailable_reason,
)
from detr_train.modeling.kernels.selection import install_attention_kernel

pytestmark = pytest.mark.kernel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LEVEL_SHAPES = [(6, 7), (3, 4), (1, 2)]
BATCH, QUERIES, HEADS, POINTS = 2, 5, 2, 3


@pytest.fixture(autouse=True)
def _run_where_triton_can_interpret(request):
    if NEEDS_FRESH_PROCESS and request.node.originalname != "test_kernels_in_a_fresh_process":
        pytest.skip("Triton was imported before TRITON_INTERPRET was set; test_kernels_in_a_fresh_process runs this")


def _level_tensors(shapes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=DEVICE)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def _inputs(head_dim: int, locations: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    num_keys = sum(h * w for h, w in LEVEL_SHAPES)
    sample_shape = (BATCH, QUERIES, HEADS, len(LEVEL_SHAPES), POINTS)
    if locations == "random":
        # [-0.25, 1.25): a third of the coordinates fall outside the map.
        sampling_locations = torch.rand(*sample_shape, 2, generator=generator) * 1.5 - 0.25
    else:
        # Multiples of 1/8: the pixel coordinate is exact in fp32 for these maps, in
        # both implementations, so samples land exactly where bilinear weights and
        # gradients switch: on pixel centres, on the map's edges (loc 0 and 1) and
        # at x = -1 or W, where a border pixel's weight reaches zero.
        sampling_locations = torch.randint(-2, 11, (*sample_shape, 2), generator=generator) / 8
    return {
        "value": torch.randn(BATCH, num_keys, HEADS, head_dim, generator=generator),
        "sampling_locations": sampling_locations,
        "attention_weights": torch.rand(*sample_shape, generator=generator).flatten(-2).softmax(-1).view(sample_shape),
    }


def _upstream_gradient(head_dim: int) -> torch.Tensor:
    return torch.randn(BATCH, QUERIES, HEADS * head_dim, generator=torch.Generator().manual_seed(1))


def _reference(value, sampling_locations, attention_weights) -> torch.Tensor:
    spatial_shapes, level_start_index = _level_tensors(LEVEL_SHAPES)
    return MultiScaleDeformableAttention()(
        value, spatial_shapes, LEVEL_SHAPES, level_start_index, sampling_locations, attention_weights, 64
    )


def _triton(value, sampling_locations, attention_weights) -> torch.Tensor:
    spatial_shapes, level_start_index = _level_tensors(LEVEL_SHAPES)
    return ms_deform_attn(value, spatial_shapes, LEVEL_SHAPES, level_start_index, sampling_locations, attention_weights)


def _output_and_grads(attention, inputs: dict, upstream: torch.Tensor) -> list[torch.Tensor]:
    leaves = {name: tensor.detach().to(DEVICE).requires_grad_() for name, tensor in inputs.items()}
    output = attention(**leaves)
    return [output, *torch.autograd.grad(output, list(leaves.values()), upstream.to(DEVICE))]


def _assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    # Relative to the tensor's largest entry: sums of terms of both signs make
    # element-wise relative errors meaningless near zero.
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rel * scale + 1e-12, f"{what}: max error {error:.3g} vs max magnitude {scale:.3g}"


NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")


@pytest.mark.parametrize("head_dim", [12, 32])
@pytest.mark.parametrize("locations", ["random", "lattice"])
def test_fp32_output_and_gradients_match_transformers(head_dim, locations):
    inputs = _inputs(head_dim, locations)
    upstream = _upstream_gradient(head_dim)
    expected = _output_and_grads(_reference, inputs, upstream)
    actual = _output_and_grads(_triton, inputs, upstream)
    for name, got, want in zip(NAMES, actual, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        _assert_relatively_close(got, want, 1e-5, name)


def test_non_contiguous_inputs_are_handled():
    inputs = _inputs(12, "random")
    # Same values, head-major memory: what a permuted projection would hand over.
    inputs["sampling_locations"] = inputs["sampling_locations"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["sampling_locations"].is_contiguous()
    upstream = _upstream_gradient(12)
    for name, got, want in zip(
        NAMES, _output_and_grads(_triton, inputs, upstream), _output_and_grads(_reference, inputs, upstream)
    ):
        _assert_relatively_close(got, want, 1e-5, name)


@pytest.mark.parametrize(
    "value_dtype, locations_dtype",
    [
        (torch.bfloat16, torch.float32),  # CUDA autocast: Linear output in bf16, softmax in fp32
        (torch.float16, torch.float16),  # half locations too: their gradient comes back in half
    ],
)
def test_half_precision_inputs_accumulate_in_fp32(value_dtype, locations_dtype):
    """Against the fp32 reference on the same (already rounded) inputs, the only error
    allowed is the final rounding of each result to its dtype, as the kernel accumulates
    in fp32: the bound is one unit in the last place (2**-7 relative for bf16, 2**-10
    for fp16). Round-to-nearest needs only half of that, but Triton's interpreter
    truncates fp32 -> bf16 (the GPU rounds to nearest even), so a whole unit is allowed.
    transformers' PyTorch path, run in half precision, misses it by more than tenfold."""
    inputs = _inputs(32, "random")
    inputs["value"] = inputs["value"].to(value_dtype)
    inputs["sampling_locations"] = inputs["sampling_locations"].to(locations_dtype)
    upstream = _upstream_gradient(32).to(value_dtype)  # the gradient of a half output is half
    actual = _output_and_grads(_triton, inputs, upstream)
    expected = _output_and_grads(_reference, {k: v.float() for k, v in inputs.items()}, upstream.float())

    last_place = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-5}
    result_dtypes = [value_dtype, value_dtype, locations_dtype, torch.float32]
    for name, got, want, dtype in zip(NAMES, actual, expected, result_dtypes):
        assert got.dtype == dtype, f"{name} is {got.dtype}, expected {dtype}"
        # Element-wise: rounding error is proportional to each element's own size.
        error_bound = last_place[dtype] * want.abs() + 1e-5 * want.abs().max()
        excess = (got.float() - want).abs() - error_bound
        assert excess.max() <= 0, f"{name}: beyond the rounding bound by {excess.max().item():.3g}"


def _tiny_detector_and_batch():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 32],
        depths=[1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3"],
    )
    config = DeformableDetrConfig(
        backbone_config=backbone,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=5,
        num_feature_levels=2,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config).to(DEVICE).eval()  # eval: no dropout between the two runs
    batch = {
        "pixel_values": torch.randn(2, 3, 64, 64, device=DEVICE),
        "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long, device=DEVICE),
        "labels": [
            {
                "class_labels": torch.tensor([0, 2], device=DEVICE),
                "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]], device=DEVICE),
            },
            {
                "class_labels": torch.tensor([1], device=DEVICE),
                "boxes": torch.tensor([[0.5, 0.5, 0.6, 0.5]], device=DEVICE),
            },
        ],
    }
    return model, batch


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "DeformableDetrMultiscaleDeformableAttention"]


def _attention_implementations(model) -> list[type]:
    return [type(m.attn) for m in _attention_modules(model)]


def test_installed_kernel_gives_the_same_loss_and_gradients():
    model, batch = _tiny_detector_and_batch()
    patched = copy.deepcopy(model)
    keys_before = list(patched.state_dict())

    assert install_attention_kernel(patched, "triton", DEVICE) == "triton"
    assert _attention_implementations(patched) == [TritonMultiScaleDeformableAttention] * 3  # 1 encoder + 2 decoder
    assert list(patched.state_dict()) == keys_before

    expected_loss, expected_grads = _loss_and_grads(model, batch)
    loss, grads = _loss_and_grads(patched, batch)
    assert abs(loss.item() - expected_loss.item()) <= 1e-5 * abs(expected_loss.item())
    assert grads.keys() == expected_grads.keys()
    # Some gradients are zero up to rounding (biases in front of a GroupNorm, say), so
    # each parameter's error is measured against its own scale plus the model's.
    model_scale = max(grad.abs().max().item() for grad in expected_grads.values())
    for name, grad in grads.items():
        error = (grad - expected_grads[name]).abs().max().item()
        assert error <= 1e-4 * expected_grads[name].abs().max().item() + 1e-6 * model_scale, name


def test_install_is_idempotent_and_reversible(caplog):
    model, _ = _tiny_detector_and_batch()
    install_attention_kernel(model, "triton", DEVICE)
    installed = [m.attn for m in _attention_modules(model)]
    with caplog.at_level(logging.INFO, logger="detr_train.modeling.kernels.selection"):
        assert install_attention_kernel(model, "triton", DEVICE) == "triton"
    assert [m.attn for m in _attention_modules(model)] == installed  # nothing rebuilt
    assert len(caplog.records) == 1 and "triton" in caplog.records[0].getMessage()

    assert install_attention_kernel(model, "pytorch", DEVICE) == "pytorch"
    assert _attention_implementations(model) == [MultiScaleDeformableAttention] * 3


def test_auto_keeps_pytorch_on_cpu():
    model, _ = _tiny_detector_and_batch()
    # Even with the interpreter available: it is a test tool, far too slow to train with.
    assert install_attention_kernel(model, "auto", torch.device("cpu")) == "pytorch"
    assert _attention_implementations(model) == [MultiScaleDeformableAttention] * 3


def test_triton_on_cpu_without_the_interpreter_is_refused_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_unavailable_reason(torch.device("cpu"))
    assert reason is not None and "CUDA" in reason
    with pytest.raises(ValueError, match="model.attention_kernel=triton") as raised:
        install_attention_kernel(torch.nn.Module(), "triton", torch.device("cpu"))
    assert reason in str(raised.value)


def test_triton_can_run_on_the_test_device():
    # On CPU thanks to the interpreter, which this module switched on.
    assert triton_unavailable_reason(DEVICE) is None


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="auto.*triton.*pytorch"):
        install_attention_kernel(torch.nn.Module(), "cuda", DEVICE)


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="this process runs the kernel tests itself")
def test_kernels_in_a_fresh_process():
    # TRITON_INTERPRET is in the environment from the start there, so no import can come first.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
