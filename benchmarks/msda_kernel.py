"""Multi-scale deformable attention alone: the fused Triton kernel against transformers' PyTorch path.

The two implementations compared, on the same inputs:
- `triton`: `ms_deform_attn` of `detr_train/modeling/kernels/deformable_attention.py` (one fused kernel
  forward, one backward);
- `pytorch`: transformers' `MultiScaleDeformableAttention` (one grid_sample per level, then a
  weighted sum), what `model.attention_kernel=pytorch` runs.

The command (`benchmarks/gpu_checks.sh` runs it as its `kernel` step):

    python benchmarks/msda_kernel.py --json msda_kernel.json [--batch 4] [--time-budget 60]

Without CUDA, to check the script itself (well under a minute on 2 cores):

    python benchmarks/msda_kernel.py --device cpu

There the Triton kernels run in Triton's CPU interpreter, a few hundred times slower than PyTorch,
so only the wiring and max |diff| mean anything. CPU defaults keep it short: the 800x1066 shape
only, its sides divided by 32 (`--scale`), batch 1, no warm-up, one timed call.

Cases: {encoder, decoder} x {800x1066, bdd} x {bf16, fp32}, most valuable first.
- Shapes are the R50 Deformable DETR's four value maps for an input image: C3, C4, C5 of the
  ResNet (strides 8, 16, 32) and a stride-2 conv of C5 (stride 64). Every stride-2 layer of the
  ResNet (7x7 stem conv, max-pool, the 3x3 convs and 1x1 shortcuts opening stages 2-4) and the
  extra conv map a side n to ceil(n / 2), so a level's side is the image's side ceil-divided by
  the stride one halving at a time. `800x1066` is an 800 x 1066 (H x W) input, a COCO image after
  the processor; `bdd` is a BDD100K frame fed at its own 1280 x 720 (W x H), i.e. H 720, W 1280.
  (The project's processor would resize that frame to 750 x 1334; `--shapes 750x1334` runs it.)
  Any `HxW` works too. `--scale N` divides the image's sides by N before the levels are computed.
- encoder: every position of every level is a query (Q = S = sum of H*W); each query's
  reference point is its own pixel centre, as the encoder's reference points are without padding.
  decoder: `--queries` (300) queries with reference points uniform in the image.
  Both: 8 heads of dim 32 (d_model 256), 4 levels, 4 points; each point is the reference point
  plus an offset N(0, 2^2) pixels of its level in x and y (a few pixels, as the model's
  initialisation puts them; some fall outside the map, where both paths read zeros); attention
  weights a softmax of N(0, 1) logits over the 16 (level, point) pairs. Random inputs, fixed seed.
- fp32: every input fp32, no autocast. bf16: the call runs under torch.autocast(bf16) with the
  input dtypes autocast gives the attention inside a real `DeformableDetrMultiscaleDeformableAttention`
  on this device, found at start-up by running one with a hook and printed. On CUDA autocast's op
  lists give value bf16 (the value projection), weights fp32 (softmax runs in fp32) and locations
  fp32 (fp32 reference points plus bf16 offsets); on CPU, where softmax is not an fp32 op, the
  weights stay bf16. grid_sample is a "promote" op under autocast, so the PyTorch path samples
  and returns in fp32 (the probe prints that too); the Triton kernel returns value's dtype.

Columns (one row per case and kernel, also in `--json`):
- fwd ms, fwd+bwd ms: median over `--repeats` calls, after `--warmup` untimed ones (on CUDA one
  more forward+backward comes first, which compiles Triton's kernels and is not timed).
  forward: the call with autograd recording, as in training.
  forward+backward: the call, then `torch.autograd.grad` of the output for value, locations and
  weights with a fixed random upstream gradient. On CUDA each call is timed with a pair of
  torch.cuda.Events; the calls are queued back to back (one synchronize after the last), as in a
  training step, so launch overhead counts only where the GPU runs out of work. On CPU:
  wall-clock time per call.
- peak MiB: torch.cuda.max_memory_allocated() during one forward+backward (peak stats reset just
  before it) minus torch.cuda.memory_allocated() just before it: the memory the call adds on top
  of its inputs and the upstream gradient, i.e. the output, what autograd saves, the
  implementation's temporaries and the three input gradients. n/a on CPU.
- speedup (triton rows): pytorch time / triton time, forward and forward+backward.
- max |diff| (triton rows): the largest absolute difference between the two forward outputs
  (compared in fp32), computed once per case: a correctness check on the side, not a test.

Where Triton cannot run (no Triton, or CPU without TRITON_INTERPRET=1, which this script sets for
`--device cpu` unless the variable is set already) the triton rows say why and PyTorch still runs.
`--time-budget` stops starting new cases after that many seconds; the ones left are listed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from machine import environment

SEED = 0
NAMED_SHAPES = {"800x1066": (800, 1066), "bdd": (720, 1280)}  # (height, width) of the input image
PARTS = ("encoder", "decoder")
PRECISIONS = ("bf16", "fp32")
KERNELS = ("pytorch", "triton")  # pytorch first: its output is the reference of the diff
HEADS, HEAD_DIM, LEVELS, POINTS = 8, 32, 4, 4
DECODER_QUERIES = 300
OFFSET_PIXELS = 2.0
IM2COL_STEP = 64  # transformers' DeformableDetrMultiscaleDeformableAttention passes this; grid_sample ignores it
CPU_SCALE = 32


# --- command line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+",
                        help=f"{', '.join(NAMED_SHAPES)} or HxW (default: both named; CPU: 800x1066)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="default: both")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, help="default: both")
    parser.add_argument("--batch", type=int, help="batch size (default 4, training.batch_size's default; CPU: 1)")
    parser.add_argument("--queries", type=int,
                        help=f"decoder queries (default {DECODER_QUERIES}; divided by --scale when it is above 1)")
    parser.add_argument("--scale", type=int,
                        help=f"divide the image's sides by this before computing the levels "
                             f"(default 1; CPU: {CPU_SCALE}, as Triton's interpreter is slow)")
    parser.add_argument("--warmup", type=int,
                        help="untimed calls before the timed ones, after one that compiles (default 3; CPU: 0)")
    parser.add_argument("--repeats", type=int, help="timed calls, the median is reported (default 20; CPU: 1)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; start no new case after this (the ones left are listed as skipped)")
    parser.add_argument("--json", type=Path, help="write the settings and every row here (after each case)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    cuda = args.device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("CUDA is not available; check the script on CPU with --device cpu")
    args.batch = args.batch or (4 if cuda else 1)
    args.scale = args.scale or (1 if cuda else CPU_SCALE)
    args.queries = args.queries or max(1, round(DECODER_QUERIES / args.scale))
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    args.repeats = args.repeats or (20 if cuda else 1)
    for name in ("batch", "scale", "queries", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    args.shapes = args.shapes or (list(NAMED_SHAPES) if cuda else ["800x1066"])
    for name in args.shapes:
        try:
            image_size(name)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def prepare_triton_interpreter(device: torch.device) -> None:
    # Triton fixes interpreter mode for its own library when it is first imported (transformers'
    # import does it), so the variable must be set before transformers or the kernel module load.
    if device.type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 on CUDA: the triton rows time Triton's CPU interpreter", flush=True)


# --- shapes


def image_size(name: str) -> tuple[int, int]:
    if name in NAMED_SHAPES:
        return NAMED_SHAPES[name]
    try:
        height, width = (int(side) for side in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"unknown shape {name!r}: use {', '.join(NAMED_SHAPES)} or HxW") from None
    if height < 1 or width < 1:
        raise ValueError(f"shape {name!r} must have positive sides")
    return height, width


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) of the value maps at strides 8, 16, 32, 64 for an image of height x width."""
    def halve(side: int) -> int:
        return -(-side // 2)

    shapes = []
    for stride in (2, 4, 8, 16, 32, 64):  # stem conv, max-pool, stages 2-4, the extra conv on C5
        height, width = halve(height), halve(width)
        if stride >= 8:
            shapes.append((height, width))
    return shapes


@dataclass(frozen=True)
class Case:
    part: str
    shape: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.part} {self.shape}"


def cases_to_run(args: argparse.Namespace) -> list[Case]:
    # Encoder first (it dominates training time), then decoder; bf16 (the training default) before fp32.
    return [Case(part, shape, precision) for shape in args.shapes for part in args.parts or PARTS
            for precision in args.precisions or PRECISIONS]


def geometry(case: Case, args: argparse.Namespace) -> dict:
    height, width = image_size(case.shape)
    image = (max(1, math.ceil(height / args.scale)), max(1, math.ceil(width / args.scale)))
    levels = level_shapes(*image)
    keys = sum(h * w for h, w in levels)
    return {"image": image, "levels": levels, "keys": keys,
            "queries": keys if case.part == "encoder" else args.queries}


# --- environment and dtypes


FP32_DTYPES = {"value": torch.float32, "locations": torch.float32, "weights": torch.float32}
FALLBACK_BF16_DTYPES = {"value": torch.bfloat16, "locations": torch.float32, "weights": torch.float32}


def autocast_dtypes(device: torch.device) -> tuple[dict, str]:
    """The dtypes the attention's inputs have under bf16 autocast in a real Deformable DETR
    attention module on `device`, and where they come from."""
    from transformers import DeformableDetrConfig
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    try:
        config = DeformableDetrConfig(d_model=HEADS * HEAD_DIM, num_feature_levels=LEVELS)
        module = DeformableDetrMultiscaleDeformableAttention(config, num_heads=HEADS, n_points=POINTS).to(device)
        seen = {}

        def record(_, inputs, output):
            value, _, _, _, locations, weights, _ = inputs
            seen.update(value=value.dtype, locations=locations.dtype, weights=weights.dtype, output=output.dtype)

        module.attn.register_forward_hook(record)
        levels = level_shapes(64, 64)
        spatial_shapes, level_start_index = level_tensors(levels, device)
        keys = sum(h * w for h, w in levels)
        hidden = torch.randn(1, keys, HEADS * HEAD_DIM, device=device)
        reference_points = torch.rand(1, keys, LEVELS, 2, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            module(hidden, encoder_hidden_states=hidden, reference_points=reference_points,
                   spatial_shapes=spatial_shapes, spatial_shapes_list=levels, level_start_index=level_start_index)
        return {name: seen[name] for name in ("value", "locations", "weights")}, (
            f"probed: transformers' attention under autocast gives its sampler value {dtype_name(seen['value'])}, "
            f"locations {dtype_name(seen['locations'])}, weights {dtype_name(seen['weights'])} "
            f"and gets {dtype_name(seen['output'])} back")
    except Exception as exc:  # noqa: BLE001 - the assumed dtypes still make a meaningful benchmark
        return dict(FALLBACK_BF16_DTYPES), f"assumed (the probe failed: {type(exc).__name__}: {exc})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- inputs


def level_tensors(levels: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return spatial_shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


@dataclass
class Inputs:
    value: torch.Tensor
    spatial_shapes: torch.Tensor
    spatial_shapes_list: list[tuple[int, int]]
    level_start_index: torch.Tensor
    locations: torch.Tensor
    weights: torch.Tensor

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.value, self.locations, self.weights


def make_inputs(case: Case, shape: dict, batch: int, dtypes: dict, device: torch.device) -> Inputs:
    # Made on the device: the largest cases hold hundreds of MB of locations.
    generator = torch.Generator(device=device).manual_seed(SEED)
    levels, queries = shape["levels"], shape["queries"]
    spatial_shapes, level_start_index = level_tensors(levels, device)
    sides = torch.tensor([(w, h) for h, w in levels], dtype=torch.float32, device=device)  # (x, y) order
    if case.part == "encoder":
        centres = [torch.stack(torch.meshgrid((torch.arange(h, device=device) + 0.5) / h,
                                              (torch.arange(w, device=device) + 0.5) / w, indexing="ij")[::-1],
                               dim=-1).reshape(-1, 2) for h, w in levels]
        reference = torch.cat(centres).expand(batch, -1, -1)
    else:
        reference = torch.rand(batch, queries, 2, generator=generator, device=device)
    offsets = torch.randn(batch, queries, HEADS, LEVELS, POINTS, 2, generator=generator, device=device)
    locations = reference[:, :, None, None, None, :] + offsets * OFFSET_PIXELS / sides[:, None, :]
    logits = torch.randn(batch, queries, HEADS, LEVELS * POINTS, generator=generator, device=device)
    weights = logits.softmax(-1).view(batch, queries, HEADS, LEVELS, POINTS)
    value = torch.randn(batch, shape["keys"], HEADS, HEAD_DIM, generator=generator, device=device)
    return Inputs(
        value=value.to(dtypes["value"]).requires_grad_(),
        spatial_shapes=spatial_shapes,
        spatial_shapes_list=list(levels),
        level_start_index=level_start_index,
        locations=locations.to(dtypes["locations"]).contiguous().requires_grad_(),
        weights=weights.to(dtypes["weights"]).contiguous().requires_grad_(),
    )


# --- the two implementations


def pytorch_attention():
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    module = MultiScaleDeformableAttention()

    def call(inputs: Inputs) -> torch.Tensor:
        return module(inputs.value, inputs.spatial_shapes, inputs.spatial_shapes_list, inputs.level_start_index,
                      inputs.locations, inputs.weights, IM2COL_STEP)

    return call


def triton_attention():
    from detr_train.modeling.kernels.deformable_attention import ms_deform_attn

    # ms_deform_attn gained spatial_shapes_list (transformers' argument order); older code lacks it.
    takes_list = "spatial_shapes_list" in inspect.signature(ms_deform_attn).parameters

    def call(inputs: Inputs) -> torch.Tensor:
        if takes_list:
            return ms_deform_attn(inputs.value, inputs.spatial_shapes, inputs.spatial_shapes_list,
                                  inputs.level_start_index, inputs.locations, inputs.weights)
        return ms_deform_attn(inputs.value, inputs.spatial_shapes, inputs.level_start_index, inputs.locations,
                              inputs.weights)

    return call


def triton_problem(device: torch.device) -> str | None:
    try:
        from detr_train.modeling.kernels.deformable_attention import triton_unavailable_reason

        return triton_unavailable_reason(device)
    except Exception as exc:  # noqa: BLE001 - a broken kernel module must not stop the PyTorch rows
        return f"detr_train.modeling.kernels.deformable_attention: {type(exc).__name__}: {exc}"


# --- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return times
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(attention, inputs: Inputs, autocast, args: argparse.Namespace) -> dict:
    device = args.device

    def forward() -> torch.Tensor:
        with autocast():
            return attention(inputs)

    upstream = []  # made by the first call: the gradient of the output must have the output's dtype

    def forward_backward() -> None:
        output = forward()
        if not upstream:
            generator = torch.Generator(device=device).manual_seed(SEED + 1)
            upstream.append(torch.randn(output.shape, generator=generator, device=device).to(output.dtype))
        torch.autograd.grad(output, inputs.leaves, upstream[0])

    if device.type == "cuda":
        # Compiles Triton's kernels outside the peak and the timing. Triton's interpreter compiles
        # nothing, and each of its calls costs seconds.
        forward_backward()
    peak = peak_mib(forward_backward, device)
    forward_times = timed_ms(forward, args.warmup, args.repeats, device)
    both_times = timed_ms(forward_backward, args.warmup, args.repeats, device)
    return {
        "status": "ok",
        "output_dtype": dtype_name(upstream[0].dtype),
        "fwd_ms": statistics.median(forward_times),
        "fwd_bwd_ms": statistics.median(both_times),
        "fwd_ms_all": forward_times,
        "fwd_bwd_ms_all": both_times,
        "peak_mib": peak,
    }


def max_abs_diff(attentions: dict, inputs: Inputs, autocast) -> float:
    with torch.no_grad(), autocast():
        reference = attentions["pytorch"](inputs).float()
        return (attentions["triton"](inputs).float() - reference).abs().max().item()


def failure(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return "OOM"
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def run_case(case: Case, args: argparse.Namespace, attentions: dict, triton_reason: str | None,
             bf16_dtypes: dict) -> list[dict]:
    device = args.device
    shape = geometry(case, args)
    common = {"case": case.label, "part": case.part, "shape": case.shape, "precision": case.precision,
              "batch": args.batch, "image_hw": list(shape["image"]), "levels_hw": [list(hw) for hw in shape["levels"]],
              "keys": shape["keys"], "queries": shape["queries"]}
    dtypes = bf16_dtypes if case.precision == "bf16" else FP32_DTYPES
    common["input_dtypes"] = {name: dtype_name(dtype) for name, dtype in dtypes.items()}
    if case.precision == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    rows = {kernel: {**common, "kernel": kernel} for kernel in KERNELS}
    try:
        inputs = make_inputs(case, shape, args.batch, dtypes, device)
    except Exception as exc:  # noqa: BLE001 - one failing case must not end a GPU session's only run
        status = failure(exc)
        for row in rows.values():
            row["status"] = status
        return list(rows.values())
    diff = None
    if triton_reason is None:
        try:
            diff = max_abs_diff(attentions, inputs, autocast)
        except Exception as exc:  # noqa: BLE001
            diff = failure(exc)
    for kernel in KERNELS:
        if kernel == "triton" and triton_reason is not None:
            rows[kernel]["status"] = f"unavailable: {triton_reason}"
            continue
        try:
            rows[kernel].update(measure(attentions[kernel], inputs, autocast, args))
        except Exception as exc:  # noqa: BLE001
            rows[kernel]["status"] = failure(exc)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    triton, pytorch = rows["triton"], rows["pytorch"]
    triton["max_abs_diff"] = diff
    if triton["status"] == "ok" and pytorch["status"] == "ok":
        triton["speedup_fwd"] = pytorch["fwd_ms"] / triton["fwd_ms"]
        triton["speedup_fwd_bwd"] = pytorch["fwd_bwd_ms"] / triton["fwd_bwd_ms"]
    del inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


# --- report


COLUMNS = (("case", 22), ("prec", 4), ("kernel", 7), ("fwd ms", 9), ("fwd+bwd ms", 10), ("peak MiB", 9),
           ("speedup fwd / f+b", 17), ("max |diff|", 10))


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _columns(texts: list[str]) -> str:
    return "  ".join(text.rjust(width) if index >= 3 else text.ljust(width)
                     for index, (text, (_, width)) in enumerate(zip(texts, COLUMNS)))


def table_row(row: dict) -> str:
    names = [row["case"], row["precision"], row["kernel"]]
    if row["status"] != "ok":
        status = "unavailable (see above)" if row["status"].startswith("unavailable") else row["status"]
        return f"{_columns(names)}  {status}"
    speedup = (f"{row['speedup_fwd']:.2f}x / {row['speedup_fwd_bwd']:.2f}x" if "speedup_fwd" in row else "")
    diff = row.get("max_abs_diff")
    diff_text = "" if row["kernel"] != "triton" else (diff if isinstance(diff, str) else _number(diff, 6))
    return _columns(names + [_number(row["fwd_ms"], 3), _number(row["fwd_bwd_ms"], 3), _number(row["peak_mib"], 1),
                             speedup, diff_text])


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def main() -> None:
    args = parse_args()
    prepare_triton_interpreter(args.device)
    started = time.perf_counter()
    device = args.device
    env = environment(device)
    interpret = f" | TRITON_INTERPRET={env['triton_interpret']}" if env["triton_interpret"] else ""
    print(f"{env['device']} | torch {env['torch']} | transformers {env['transformers']} | triton {env['triton']} "
          f"| CUDA {env['cuda']}{interpret}", flush=True)
    triton_reason = triton_problem(device)
    if triton_reason:
        print(f"triton unavailable: {triton_reason}", flush=True)
    attentions = {"pytorch": pytorch_attention(), "triton": triton_attention() if triton_reason is None else None}
    need_bf16 = "bf16" in (args.precisions or PRECISIONS)
    bf16_dtypes, bf16_source = autocast_dtypes(device) if need_bf16 else (dict(FALLBACK_BF16_DTYPES), "not run")
    cases = cases_to_run(args)
    if need_bf16:
        print(f"bf16 input dtypes {bf16_source}", flush=True)
    print(f"batch {args.batch}, {HEADS} heads x {HEAD_DIM}, {LEVELS} levels, {POINTS} points; "
          f"{args.warmup} warm-up + {args.repeats} timed calls (median)"
          + (f"; image sides divided by {args.scale}" if args.scale > 1 else ""), flush=True)
    for shape in dict.fromkeys(case.shape for case in cases):
        where = geometry(Case("encoder", shape, "fp32"), args)
        print(f"  {shape}: image {where['image'][0]}x{where['image'][1]}, levels "
              + ", ".join(f"{h}x{w}" for h, w in where["levels"])
              + f"; encoder Q = S = {where['keys']}, decoder Q = {args.queries}", flush=True)
    if device.type == "cuda":
        print("peak MiB: max_memory_allocated during one fwd+bwd minus memory_allocated before it "
              "(inputs and upstream gradient excluded)", flush=True)
    else:
        print("CPU: the triton rows time Triton's interpreter; only the wiring and max |diff| mean anything",
              flush=True)
    print(_columns([name for name, _ in COLUMNS]), flush=True)
    settings = {key: str(value) if isinstance(value, (Path, torch.device)) else value
                for key, value in vars(args).items()}
    payload = {"environment": env, "settings": settings,
               "bf16_input_dtypes": {name: dtype_name(dtype) for name, dtype in bf16_dtypes.items()},
               "bf16_input_dtypes_source": bf16_source, "triton_unavailable": triton_reason,
               "peak_mib_measures": "max_memory_allocated during one forward+backward minus memory_allocated "
                                    "just before it: output, saved activations, temporaries, input gradients",
               "rows": [], "skipped_cases": []}
    for index, case in enumerate(cases):
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            payload["skipped_cases"] = [f"{c.label} {c.precision}" for c in cases[index:]]
            print(f"time budget of {args.time_budget:.0f}s spent; skipped: {', '.join(payload['skipped_cases'])}",
                  flush=True)
            break
        for row in run_case(case, args, attentions, triton_reason, bf16_dtypes):
            payload["rows"].append(row)
            print(table_row(row), flush=True)
        write_json(args.json, payload)
    write_json(args.json, payload)
    print(f"\n{len(payload['rows']) // len(KERNELS)} cases in {time.perf_counter() - started:.0f}s"
          + (f"; JSON in {args.json}" if args.json else ""), flush=True)


if __name__ == "__main__":
    main()
