"""Run the Triton kernel once against transformers' PyTorch path before trusting it.

A kernel that fails to compile, launches badly or computes something slightly different
on a real GPU would break a user's first run or quietly train a worse model. So before
`model.attention_kernel=auto` picks Triton on a device and dtype, both implementations
run a small random problem there, forward and backward, and must agree within the
tolerances of the kernel tests:

- fp32: every result within 1e-5 of the reference's largest entry;
- bf16 / fp16 inputs: each element within one unit in the last place of its result dtype
  (2**-7 / 2**-10 relative) plus 1e-5 of the largest entry, against the fp32 reference on
  the same rounded inputs, since the kernel accumulates in fp32 and rounds once.

The problem has a 1x1 level, non-square odd levels and a third of the points outside
[0, 1], the cases where sampling code goes wrong first. The result is cached per process
and (device, dtype); after compilation the check takes milliseconds.
"""

from __future__ import annotations

import functools

import torch

from detr_train.modeling.kernels.deformable_attention import ms_deform_attn

LEVEL_SHAPES = [(5, 7), (3, 2), (1, 1)]
BATCH, QUERIES, HEADS, POINTS, HEAD_DIM = 2, 7, 2, 3, 16

# One unit in the last place of each result dtype (see the module docstring).
_LAST_PLACE = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}
_RELATIVE_TO_LARGEST = 1e-5
RESULT_NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")


def _problem(device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    sample_shape = (BATCH, QUERIES, HEADS, len(LEVEL_SHAPES), POINTS)
    num_keys = sum(height * width for height, width in LEVEL_SHAPES)
    areas = torch.tensor([height * width for height, width in LEVEL_SHAPES])
    weights = torch.rand(sample_shape, generator=generator).flatten(-2).softmax(-1).view(sample_shape)
    tensors = {
        "value": torch.randn(BATCH, num_keys, HEADS, HEAD_DIM, generator=generator).to(dtype),
        # [-0.25, 1.25): a third of the coordinates fall outside the map.
        "sampling_locations": torch.rand(*sample_shape, 2, generator=generator) * 1.5 - 0.25,
        # Locations and weights stay fp32, as autocast hands them to the attention.
        "attention_weights": weights,
        "upstream": torch.randn(BATCH, QUERIES, HEADS * HEAD_DIM, generator=generator).to(dtype),
    }
    levels = {
        "spatial_shapes": torch.tensor(LEVEL_SHAPES, dtype=torch.long),
        "level_start_index": torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]),
    }
    return {name: tensor.to(device) for name, tensor in {**tensors, **levels}.items()}


def _outputs_and_grads(attention, problem: dict, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The output and the gradients of value, locations and weights; inputs cast to `dtype` if given."""
    names = ("value", "sampling_locations", "attention_weights")
    leaves = [problem[name].to(dtype or problem[name].dtype).detach().requires_grad_() for name in names]
    value, locations, weights = leaves
    output = attention(value, problem["spatial_shapes"], LEVEL_SHAPES, problem["level_start_index"], locations, weights)
    upstream = problem["upstream"].to(dtype or problem["upstream"].dtype)
    return [output, *torch.autograd.grad(output, leaves, upstream)]


def _pytorch_attention(value, spatial_shapes, shapes_list, level_start_index, locations, weights):
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    return MultiScaleDeformableAttention()(value, spatial_shapes, shapes_list, level_start_index, locations, weights, 64)


def _mismatch(name: str, got: torch.Tensor, want: torch.Tensor, expected_dtype: torch.dtype) -> str | None:
    if got.dtype != expected_dtype or got.shape != want.shape:
        return f"{name} is {got.dtype} {tuple(got.shape)}, expected {expected_dtype} {tuple(want.shape)}"
    want = want.double()
    bound = _LAST_PLACE[expected_dtype] * want.abs() + _RELATIVE_TO_LARGEST * want.abs().max()
    excess = ((got.double() - want).abs() - bound).max().item()
    if not excess <= 0:  # also catches NaN
        error = (got.double() - want).abs().max().item()
        return f"{name} differs from the PyTorch path by up to {error:.3g} (largest entry {want.abs().max().item():.3g})"
    return None


@functools.cache
def kernel_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernel agrees with the PyTorch path on `device` in `dtype`, else
    a one-line reason: the exception it raised, or the first result that differs.

    `device` should carry an index for CUDA (the cache key): `cuda` and `cuda:0` are two keys.
    """
    problem = _problem(device, dtype)
    try:
        actual = _outputs_and_grads(ms_deform_attn, problem, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch error surfaces here, not later in training
    except Exception as exc:  # noqa: BLE001 - any failure of the kernel means: do not use it
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the kernel failed on {device} in {dtype}: {type(exc).__name__}: {message}"
    expected = _outputs_and_grads(_pytorch_attention, problem, torch.float32)
    result_dtypes = (dtype, dtype, torch.float32, torch.float32)
    for name, got, want, result_dtype in zip(RESULT_NAMES, actual, expected, result_dtypes):
        mismatch = _mismatch(name, got, want, result_dtype)
        if mismatch:
            return f"the kernel disagrees with the PyTorch path on {device} in {dtype}: {mismatch}"
    return None
