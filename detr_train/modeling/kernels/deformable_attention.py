"""Multi-scale deformable attention as one fused Triton kernel (forward and backward).

The math. For every batch b, query q and head h (a "row" of the kernel):

    out[b, q, h, :] = sum over levels l, points p of
                      w[b, q, h, l, p] * bilinear(value_l[b, :, :, h, :], loc[b, q, h, l, p])

`loc` is a normalised (x, y) in [0, 1] and level l is an (H_l, W_l) map stored
row-major inside `value` from `level_start_index[l]` on. The sampling follows
`grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`
exactly: the pixel coordinate is x = loc_x * W_l - 0.5 (y likewise), the four
neighbouring pixels are weighted by (1 - fx)(1 - fy), fx(1 - fy), (1 - fx)fy,
fx fy with fx = x - floor(x), and a neighbour outside the map contributes zero
(its value is taken as 0, in the backward pass too).

The backward pass, per row and sample (l, p), with g = grad_out[b, q, h, :] and
v00, v10, v01, v11 the four neighbours (zero when outside):

    grad_w       = <g, bilinear sample>
    grad_loc_x   = w * W_l * ((1 - fy) <g, v10 - v00> + fy <g, v11 - v01>)
    grad_loc_y   = w * H_l * ((1 - fx) <g, v01 - v00> + fx <g, v11 - v10>)
    grad_value  += w * corner_weight * g        (scattered with atomic adds)

Precision. Under autocast `value` arrives in bf16/fp16 while the weights are
fp32 and the locations fp32 or half. Every product and sum is done in fp32 in
registers and only the result is rounded: the output to value's dtype, each
gradient to its input's dtype. The scatter into grad_value accumulates in an
fp32 buffer because many rows add into the same pixel; half-precision atomics
would lose the small contributions. That is what makes running the attention
in half precision safe, without an fp32 island around the module.

Layout. A kernel program owns BLOCK_ROWS consecutive (b, q, h) rows times the
whole head dimension: rows of the output are contiguous, and each neighbour
fetch reads value[b, pixel, h, :], D contiguous elements, so loads along D are
coalesced. Levels and points are loops inside the kernel.

Triton is optional: without it (or without CUDA) `selection.install_attention_kernel`
keeps transformers' PyTorch implementation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

# Imported on first use (`_import_triton`), never at import time: importing this
# module must work without Triton, and must not fix Triton's interpreter mode
# (see `_interpreter_problem`) before a test had the chance to ask for it.
triton = None
tl = None

log = logging.getLogger(__name__)


# Tile of BLOCK_ROWS x BLOCK_D elements per kernel program: 32 rows at D=32. With
# 4 warps this compiles for sm_90 (bf16, D=32) to 16-byte loads along D, vector
# atomics and no spills (64 registers forward, 94 backward), and still leaves
# ~1200 programs for the 300-query decoder at B=16. Checked with ptxas, not timed.
_TILE_ELEMENTS = 1024
_MAX_BLOCK_ROWS = 64
_NUM_WARPS = 4


# The kernels are plain functions here and become Triton kernels on first use
# (`_triton_kernels`), not at import: `triton.jit` decides at decoration time
# whether a function is compiled or run by the CPU interpreter (it reads
# TRITON_INTERPRET then), and this module may well be imported before a test
# sets that variable. They call no @triton.jit helpers of their own: both the
# compiler and the interpreter look callees up in this module's globals, so a
# helper would have to be decorated at import, in whatever mode was set then.


def _forward_kernel(
    value_ptr,
    spatial_shapes_ptr,
    level_start_ptr,
    locations_ptr,
    weights_ptr,
    out_ptr,
    num_rows,
    num_queries,
    num_keys,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    # int64 offsets: B * S * H * D passes 2**31 for large batches of large images.
    rows = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    heads = rows % NUM_HEADS
    batches = rows // (num_queries * NUM_HEADS)
    row_value_base = (batches * num_keys * NUM_HEADS + heads) * HEAD_DIM
    pixel_stride = NUM_HEADS * HEAD_DIM

    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(spatial_shapes_ptr + 2 * level).to(tl.float32)
        width_int = tl.load(spatial_shapes_ptr + 2 * level + 1)
        width = width_int.to(tl.float32)
        level_start = tl.load(level_start_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            sample = rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            loc_x = tl.load(locations_ptr + 2 * sample, mask=row_ok, other=0.0).to(tl.float32)
            loc_y = tl.load(locations_ptr + 2 * sample + 1, mask=row_ok, other=0.0).to(tl.float32)
            weight = tl.load(weights_ptr + sample, mask=row_ok, other=0.0).to(tl.float32)

            x = loc_x * width - 0.5
            y = loc_y * height - 0.5
            x0 = tl.floor(x)
            y0 = tl.floor(y)
            fx = x - x0
            fy = y - y0
            # Validity is decided on floats so that far-away locations cannot overflow
            # the integer conversion; the clamp only keeps the index of an unused
            # (masked) neighbour finite.
            x0_ok = (x0 >= 0.0) & (x0 < width)
            x1_ok = (x0 >= -1.0) & (x0 < width - 1.0)
            y0_ok = (y0 >= 0.0) & (y0 < height)
            y1_ok = (y0 >= -1.0) & (y0 < height - 1.0)
            x0_index = tl.minimum(tl.maximum(x0, -1.0), width).to(tl.int64)
            y0_index = tl.minimum(tl.maximum(y0, -1.0), height).to(tl.int64)
            pixel00 = level_start + y0_index * width_int + x0_index
            base00 = row_value_base + pixel00 * pixel_stride

            offsets00 = base00[:, None] + dims[None, :]
            offsets10 = offsets00 + pixel_stride
            offsets01 = offsets00 + width_int * pixel_stride
            offsets11 = offsets01 + pixel_stride
            ok = row_ok[:, None] & dim_ok[None, :]
            v00 = tl.load(value_ptr + offsets00, mask=ok & (y0_ok & x0_ok)[:, None], other=0.0).to(tl.float32)
            v10 = tl.load(value_ptr + offsets10, mask=ok & (y0_ok & x1_ok)[:, None], other=0.0).to(tl.float32)
            v01 = tl.load(value_ptr + offsets01, mask=ok & (y1_ok & x0_ok)[:, None], other=0.0).to(tl.float32)
            v11 = tl.load(value_ptr + offsets11, mask=ok & (y1_ok & x1_ok)[:, None], other=0.0).to(tl.float32)

            acc += (weight * (1.0 - fx) * (1.0 - fy))[:, None] * v00
            acc += (weight * fx * (1.0 - fy))[:, None] * v10
            acc += (weight * (1.0 - fx) * fy)[:, None] * v01
            acc += (weight * fx * fy)[:, None] * v11

    out_offsets = rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _backward_kernel(
    value_ptr,
    spatial_shapes_ptr,
    level_start_ptr,
    locations_ptr,
    weights_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_locations_ptr,
    grad_weights_ptr,
    num_rows,
    num_queries,
    num_keys,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Same sampling geometry as _forward_kernel (kept in step by hand, see above).
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    heads = rows % NUM_HEADS
    batches = rows // (num_queries * NUM_HEADS)
    row_value_base = (batches * num_keys * NUM_HEADS + heads) * HEAD_DIM
    pixel_stride = NUM_HEADS * HEAD_DIM
    ok = row_ok[:, None] & dim_ok[None, :]

    grad_out = tl.load(grad_out_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=ok, other=0.0).to(tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(spatial_shapes_ptr + 2 * level).to(tl.float32)
        width_int = tl.load(spatial_shapes_ptr + 2 * level + 1)
        width = width_int.to(tl.float32)
        level_start = tl.load(level_start_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            sample = rows * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            loc_x = tl.load(locations_ptr + 2 * sample, mask=row_ok, other=0.0).to(tl.float32)
            loc_y = tl.load(locations_ptr + 2 * sample + 1, mask=row_ok, other=0.0).to(tl.float32)
            weight = tl.load(weights_ptr + sample, mask=row_ok, other=0.0).to(tl.float32)

            x = loc_x * width - 0.5
            y = loc_y * height - 0.5
            x0 = tl.floor(x)
            y0 = tl.floor(y)
            fx = x - x0
            fy = y - y0
            x0_ok = (x0 >= 0.0) & (x0 < width)
            x1_ok = (x0 >= -1.0) & (x0 < width - 1.0)
            y0_ok = (y0 >= 0.0) & (y0 < height)
            y1_ok = (y0 >= -1.0) & (y0 < height - 1.0)
            x0_index = tl.minimum(tl.maximum(x0, -1.0), width).to(tl.int64)
            y0_index = tl.minimum(tl.maximum(y0, -1.0), height).to(tl.int64)
            pixel00 = level_start + y0_index * width_int + x0_index
            base00 = row_value_base + pixel00 * pixel_stride

            offsets00 = base00[:, None] + dims[None, :]
            offsets10 = offsets00 + pixel_stride
            offsets01 = offsets00 + width_int * pixel_stride
            offsets11 = offsets01 + pixel_stride
            mask00 = ok & (y0_ok & x0_ok)[:, None]
            mask10 = ok & (y0_ok & x1_ok)[:, None]
            mask01 = ok & (y1_ok & x0_ok)[:, None]
            mask11 = ok & (y1_ok & x1_ok)[:, None]
            v00 = tl.load(value_ptr + offsets00, mask=mask00, other=0.0).to(tl.float32)
            v10 = tl.load(value_ptr + offsets10, mask=mask10, other=0.0).to(tl.float32)
            v01 = tl.load(value_ptr + offsets01, mask=mask01, other=0.0).to(tl.float32)
            v11 = tl.load(value_ptr + offsets11, mask=mask11, other=0.0).to(tl.float32)

            # One reduction over D per neighbour; all three small gradients are
            # linear combinations of these four dot products.
            g00 = tl.sum(grad_out * v00, axis=1)
            g10 = tl.sum(grad_out * v10, axis=1)
            g01 = tl.sum(grad_out * v01, axis=1)
            g11 = tl.sum(grad_out * v11, axis=1)
            w00 = (1.0 - fx) * (1.0 - fy)
            w10 = fx * (1.0 - fy)
            w01 = (1.0 - fx) * fy
            w11 = fx * fy
            grad_weight = w00 * g00 + w10 * g10 + w01 * g01 + w11 * g11
            grad_x = weight * width * ((1.0 - fy) * (g10 - g00) + fy * (g11 - g01))
            grad_y = weight * height * ((1.0 - fx) * (g01 - g00) + fx * (g11 - g10))
            tl.store(grad_weights_ptr + sample, grad_weight.to(grad_weights_ptr.dtype.element_ty), mask=row_ok)
            grad_location_dtype = grad_locations_ptr.dtype.element_ty
            tl.store(grad_locations_ptr + 2 * sample, grad_x.to(grad_location_dtype), mask=row_ok)
            tl.store(grad_locations_ptr + 2 * sample + 1, grad_y.to(grad_location_dtype), mask=row_ok)

            # Many rows sample the same pixel, hence atomics; no ordering is needed.
            weighted_grad = weight[:, None] * grad_out
            tl.atomic_add(grad_value_ptr + offsets00, w00[:, None] * weighted_grad, mask=mask00, sem="relaxed")
            tl.atomic_add(grad_value_ptr + offsets10, w10[:, None] * weighted_grad, mask=mask10, sem="relaxed")
            tl.atomic_add(grad_value_ptr + offsets01, w01[:, None] * weighted_grad, mask=mask01, sem="relaxed")
            tl.atomic_add(grad_value_ptr + offsets11, w11[:, None] * weighted_grad, mask=mask11, sem="relaxed")


def _import_triton() -> str | None:
    """Import Triton into this module's globals, where the kernels look up `tl`.
    Returns why it cannot be imported, or None."""
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as triton_language
        except (ImportError, OSError, RuntimeError) as exc:  # a broken install must not break "pytorch"
            return f"triton cannot be imported ({type(exc).__name__}: {exc})"
        triton, tl = triton_module, triton_language
    return None


def _interpreter_requested() -> bool:
    """Whether `triton.jit` would build interpreter functions right now (Triton imported)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # re-reads the variable on every access, with Triton's own parsing
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # what Triton releases before `knobs` compare


def _interpreter_problem() -> str | None:
    # Triton decorates its own library (tl.sum, tl.zeros, ...) with @triton.jit when it
    # is first imported, so the interpreter mode of those is fixed at that moment.
    if isinstance(tl.sum, triton.runtime.JITFunction):
        return (
            "TRITON_INTERPRET was set after triton had been imported; set it before anything "
            "imports triton (torch._dynamo and transformers do)"
        )
    return None


@functools.cache
def _triton_kernels(interpret: bool) -> SimpleNamespace:
    # `interpret` is only the cache key: one set of kernels per mode, so a process
    # that switches TRITON_INTERPRET gets kernels built in the matching mode.
    del interpret
    return SimpleNamespace(forward=triton.jit(_forward_kernel), backward=triton.jit(_backward_kernel))


def _kernels() -> SimpleNamespace:
    problem = _import_triton()
    if problem is None and _interpreter_requested():
        problem = _interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)
    return _triton_kernels(_interpreter_requested())


def _launch_geometry(num_rows: int, head_dim: int) -> dict:
    block_d = triton.next_power_of_2(head_dim)
    block_rows = max(1, min(_MAX_BLOCK_ROWS, _TILE_ELEMENTS // block_d))
    return {
        "grid": (triton.cdiv(num_rows, block_rows),),
        "constants": {"BLOCK_ROWS": block_rows, "BLOCK_D": block_d},
    }


def _on_device(tensor: torch.Tensor):
    # Triton launches on the *current* CUDA device, which need not be the tensor's.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _describe(name: str, tensor: torch.Tensor) -> str:
    return f"{name} {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')} on {tensor.device}"


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    spatial_shapes_list: list[tuple[int, int]],
    level_start_index: torch.Tensor,
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> None:
    """Raise ValueError unless the kernel can read these tensors safely.

    The kernel reads whatever addresses the shapes imply, so every relation between
    the tensors is checked here, on the host, from the shapes list and the tensors'
    metadata only: reading a device tensor's values would be a host sync.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (batch, keys, heads, head_dim), got {_describe('value', value)}")
    batch, num_keys, heads, _ = value.shape
    levels = len(spatial_shapes_list)
    expected_keys = sum(int(height) * int(width) for height, width in spatial_shapes_list)
    if num_keys != expected_keys:
        raise ValueError(
            f"value has {num_keys} keys but the levels {list(spatial_shapes_list)} hold {expected_keys} "
            f"(sum of H*W): {_describe('value', value)}"
        )
    if tuple(spatial_shapes.shape) != (levels, 2):
        raise ValueError(
            f"spatial_shapes must be ({levels} levels, 2) like spatial_shapes_list {list(spatial_shapes_list)}, "
            f"got {_describe('spatial_shapes', spatial_shapes)}"
        )
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"level_start_index must have one start per level ({levels},), "
            f"got {_describe('level_start_index', level_start_index)}"
        )
    if (locations.dim() != 6 or locations.shape[-1] != 2 or locations.shape[0] != batch
            or locations.shape[2] != heads or locations.shape[3] != levels):
        raise ValueError(
            f"sampling_locations must be (batch={batch}, queries, heads={heads}, levels={levels}, points, 2) "
            f"for {_describe('value', value)}, got {_describe('sampling_locations', locations)}"
        )
    if weights.shape != locations.shape[:-1]:
        raise ValueError(
            f"attention_weights must match sampling_locations in batch, queries, heads, levels and points: "
            f"{_describe('attention_weights', weights)} vs {_describe('sampling_locations', locations)}"
        )
    for name, tensor in (("sampling_locations", locations), ("attention_weights", weights)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {_describe(name, tensor)}")
    if not value.is_floating_point():
        raise ValueError(f"value must be floating point, got {_describe('value', value)}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {_describe(name, tensor)}")
    for name, tensor in (
        ("spatial_shapes", spatial_shapes),
        ("level_start_index", level_start_index),
        ("sampling_locations", locations),
        ("attention_weights", weights),
    ):
        # A copy across devices here would be a blocking transfer on every call.
        if tensor.device != value.device:
            raise ValueError(f"{_describe(name, tensor)} is not on value's device: {_describe('value', value)}")


def _problem_sizes(value: torch.Tensor, locations: torch.Tensor) -> dict:
    batch, num_keys, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    return {
        "num_rows": batch * num_queries * num_heads,
        "num_queries": num_queries,
        "num_keys": num_keys,
        "NUM_HEADS": num_heads,
        "HEAD_DIM": head_dim,
        "NUM_LEVELS": num_levels,
        "NUM_POINTS": num_points,
    }


class MultiScaleDeformableAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; see the module docstring for the math."""

    @staticmethod
    def forward(
        ctx,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        # The kernels index with flat offsets, so every tensor must be dense row-major.
        value = value.contiguous()
        spatial_shapes = spatial_shapes.to(dtype=torch.int64).contiguous()
        level_start_index = level_start_index.to(dtype=torch.int64).contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()

        batch, _, num_heads, head_dim = value.shape
        num_queries = sampling_locations.shape[1]
        out = value.new_empty(batch, num_queries, num_heads, head_dim)
        sizes = _problem_sizes(value, sampling_locations)
        if sizes["num_rows"] > 0:
            kernels = _kernels()
            geometry = _launch_geometry(sizes["num_rows"], head_dim)
            with _on_device(value):
                kernels.forward[geometry["grid"]](
                    value,
                    spatial_shapes,
                    level_start_index,
                    sampling_locations,
                    attention_weights,
                    out,
                    **sizes,
                    **geometry["constants"],
                    num_warps=_NUM_WARPS,
                )
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return out.view(batch, num_queries, num_heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        # fp32 scatter target: see "Precision" in the module docstring.
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        grad_locations = torch.empty_like(sampling_locations)
        grad_weights = torch.empty_like(attention_weights)
        sizes = _problem_sizes(value, sampling_locations)
        if sizes["num_rows"] > 0:
            kernels = _kernels()
            geometry = _launch_geometry(sizes["num_rows"], value.shape[-1])
            with _on_device(value):
                kernels.backward[geometry["grid"]](
                    value,
                    spatial_shapes,
                    level_start_index,
                    sampling_locations,
                    attention_weights,
                    grad_output,
                    grad_value,
                    grad_locations,
                    grad_weights,
                    **sizes,
                    **geometry["constants"],
                    num_warps=_NUM_WARPS,
                )
        return grad_value.to(value.dtype), None, None, grad_locations, grad_weights


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    spatial_shapes_list: list[tuple[int, int]],
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with the Triton kernels.

    value (B, S, H, D); spatial_shapes (L, 2) of (height, width) and spatial_shapes_list,
    the same on the host; level_start_index (L,); sampling_locations (B, Q, H, L, P, 2)
    normalised (x, y); attention_weights (B, Q, H, L, P). The arguments come in the order of
    transformers' `MultiScaleDeformableAttention`. Returns (B, Q, H * D) in value's dtype.
    Inconsistent shapes raise ValueError before anything is launched (`check_inputs`).
    """
    check_inputs(value, spatial_shapes, spatial_shapes_list, level_start_index, sampling_locations, attention_weights)
    return MultiScaleDeformableAttentionFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class TritonMultiScaleDeformableAttention(torch.nn.Module):
    """Drop-in for transformers' `MultiScaleDeformableAttention` (the `.attn` of each
    `DeformableDetrMultiscaleDeformableAttention`). Parameter-free, like the original."""

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        # The kernel reads the shapes from the tensor; the host list only checks them.
        del im2col_step
        return ms_deform_attn(
            value, value_spatial_shapes, value_spatial_shapes_list, level_start_index, sampling_locations,
            attention_weights,
        )


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on tensors of `device`, else a one-line reason."""
    device = torch.device(device)
    import_problem = _import_triton()
    if import_problem:
        return import_problem
    if _interpreter_requested():
        return _interpreter_problem()
    if device.type != "cuda":
        return (
            f"the Triton kernels need a CUDA device, not {device.type} (TRITON_INTERPRET=1 runs them, slowly, on CPU)"
        )
    if not torch.cuda.is_available():
        return "CUDA is not available to PyTorch"
    return None
