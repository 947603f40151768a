"""Training throughput of R50 Deformable DETR on one GPU: detr-train's fast paths against the old code.

The command for the README's table (the default cells, a few minutes on an H100; `benchmarks/gpu_checks.sh`
runs it on a GPU machine):

    python benchmarks/gpu_throughput.py --json gpu_throughput.json

More cells: `--full` (every shape x precision x batch size x path), or any of `--shapes`,
`--precisions`, `--batch-sizes`, `--paths` (the product of the lists given; a list not given
takes all its values). Without CUDA, to check the script itself:

    python benchmarks/gpu_throughput.py --device cpu --model-size tiny

What is trained. `model=deformable_detr` (ResNet-50, 6+6 layers, 300 queries), random init,
10 classes, on random batches made once per shape and batch size (fixed seed): N(0, 1) pixels,
6-10 boxes per image with sides log-uniform from 2% to 50% of the image. One training step is
`engine.TrainStep` (autocast, loss, backward, grad clip 0.1, AdamW with the project's parameter
groups), fed pinned CPU batches that it copies non_blocking, as the trainer's loader does.

Shapes are what the project's image processor (`model.build_image_processor`, shortest edge
`data.image_size` = 800, longest edge capped at round(data.max_size_ratio x 800) =
round(1.667 x 800) = 1334) makes of a source image, computed at start-up by running it:
- `800x1066`: a COCO-like 640x480 image becomes 800 x 1066 (the cap does not bind);
- `bdd`: a BDD100K 1280x720 image. Uncapped it would be 800 x 1422; the cap makes the long side
  1334 and the short side round(1334 x 720 / 1280) = 750: 750 x 1334 (transformers 5.24).
- `HxW`: any explicit size, used as is (e.g. `96x96`, the tiny model's default).

Precisions: `fp32` (TF32 off), `tf32` (fp32 with TF32 tensor cores), `bf16`, `fp16` (autocast,
fp16 with the GradScaler). AMP cells keep TF32 on for what stays in fp32, as the trainer does.

Paths:
- `fast`: what detr-train does by default on CUDA (`fast_paths.apply_fast_paths`): the fused
  Triton deformable attention (`model.attention_kernel=auto`), detr-train's own criterion,
  the encoder without its isfinite host sync, fused AdamW.
- `baseline`: what the code did before: transformers' own loss (no criterion is installed, so
  `model.loss_function` is transformers'), transformers' encoder layers with their host sync,
  `model.attention_kernel=pytorch` (grid_sample), foreach AdamW (`fused_optimizer=false`), and
  in AMP cells the old fp32 island, re-created here (`run_attention_in_fp32`): every
  `DeformableDetrMultiscaleDeformableAttention` forward runs with autocast off on float32 inputs.

Columns (one row per cell, also in `--json`):
- img/s: batch size / median step time over `--steps` timed steps, after `--warmup` steps;
  each step is timed between two `torch.cuda.synchronize()` calls.
- peak GiB: `torch.cuda.max_memory_allocated()` over the warm-up and timed steps, reset
  (`reset_peak_memory_stats`) after the model is on the GPU and before its first step: weights,
  gradients, AdamW state and activations.
- syncs/step: host syncs per step, counted in a torch.profiler trace of `--profile-steps` steps
  (after the timed ones): calls of cudaStreamSynchronize, cudaDeviceSynchronize,
  cudaEventSynchronize, the synchronous cudaMemcpy and cudaFree (and their driver-API twins)
  made inside a step, plus each cudaMemcpyAsync into pageable host memory (synchronous by CUDA's
  rules) that is not followed at once by a stream synchronize (`.item()` is one copy and one
  synchronize: counted once). Syncs of other libraries through other calls are not seen.
- attn %: GPU time of the deformable-attention sampling kernels over all kernel time in the same
  trace: the two Triton kernels (`_forward_kernel`, `_backward_kernel` of
  `detr_train/modeling/kernels/deformable_attention.py`) or `grid_sampler*` kernels. On the PyTorch path
  only grid_sample's kernels are counted, not the reshapes, products and sums around them.
- GFLOP/step and MFU %: FLOPs of forward + backward counted with
  `torch.utils.flop_counter.FlopCounterMode` on one image on the PyTorch attention path, in fp32,
  times the batch size (every convolution and matmul is per image). FlopCounterMode counts
  convolutions and matmuls only: neither grid_sample nor the Triton op, so both paths get the
  same count. MFU = FLOPs per step / step time / the GPU's dense peak for the cell's precision:
  bf16/fp16 tensor cores for bf16 and fp16, TF32 tensor cores for tf32, plain fp32 for fp32
  (`PEAK_TFLOPS`, or `--peak-tflops`).

On CPU (`--device cpu`) peak memory, syncs, attention share and MFU are n/a.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import re
import statistics
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from machine import environment

from detr_train.checkpointing.state import TrainState
from detr_train.config import config_dir
from detr_train.modeling.build import build_image_processor, build_model
from detr_train.modeling.fast_paths import apply_fast_paths, set_tf32
from detr_train.modeling.kernels import deformable_attention
from detr_train.modeling.kernels.selection import install_attention_kernel
from detr_train.modeling.precision import resolve_precision
from detr_train.training.loop import NonFiniteGuard, TrainStep, to_device
from detr_train.training.optim import LRSchedule, build_optimizer

MODEL_CONFIGS = {"r50": "deformable_detr", "tiny": "deformable_detr_tiny"}
CLASS_NAMES = [f"class_{index}" for index in range(10)]
SEED = 0

# Named shapes: the dataset config whose processor settings apply, and a source image (h, w).
NAMED_SHAPES = {"800x1066": ("coco", (480, 640)), "bdd": ("bdd100k", (720, 1280))}
TINY_SHAPE = "96x96"
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
BATCH_SIZES = (4, 8, 16)
PATHS = ("fast", "baseline")

# precision: (training.amp, training.amp_dtype, training.tf32)
PRECISION_SETTINGS = {
    "fp32": (False, "bfloat16", False),
    "tf32": (False, "bfloat16", True),
    "bf16": (True, "bfloat16", True),
    "fp16": (True, "float16", True),
}
PATH_OVERRIDES = {
    "fast": [],  # the defaults: attention_kernel=auto, fused_optimizer=true
    "baseline": ["model.attention_kernel=pytorch", "training.fused_optimizer=false"],
}

# Dense peak TFLOP/s (no sparsity) by a word of the GPU's name, first match wins: bf16/fp16, TF32, fp32.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.0, 495.0, 67.0)),  # SXM
    ("H200", (989.0, 495.0, 67.0)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L4", (121.0, 60.0, 30.0)),
)
PEAK_INDEX = {"bf16": 0, "fp16": 0, "tf32": 1, "fp32": 2}

# Targets of the issue, checked in the summary (fast path).
TARGET_IMAGES_PER_S = {16: 50.0, 8: 40.0}  # bf16, by batch size
TARGET_BF16_SPEEDUP = 1.6  # bf16 / fp32 without TF32, same batch
TARGET_BF16_MEMORY = 0.65  # bf16 / fp32 peak memory
TARGET_SYNCS_PER_STEP = 10

STEP_MARK = "gpu_throughput.train_step"  # profiler range around each profiled step
SYNC_CALLS = {
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaFree",
    "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize", "cuMemcpyDtoH_v2", "cuMemFree_v2",
}
ATTENTION_KERNELS = {deformable_attention._forward_kernel.__name__, deformable_attention._backward_kernel.__name__}

# The default cells, most valuable first (a run cut short keeps those): (shape, precision, batch, path).
DEFAULT_CELLS = (
    ("800x1066", "bf16", 8, "fast"),
    ("800x1066", "bf16", 8, "baseline"),
    ("800x1066", "fp32", 8, "fast"),
    ("800x1066", "fp32", 8, "baseline"),
    ("800x1066", "bf16", 16, "fast"),
    ("800x1066", "tf32", 8, "fast"),
    ("800x1066", "fp16", 8, "fast"),
    ("bdd", "bf16", 8, "fast"),
)


@dataclass(frozen=True)
class Cell:
    shape: str
    precision: str
    batch_size: int
    path: str


@dataclass(frozen=True)
class Setup:
    """How a cell's model trains: what TrainStep and the optimizer need to know."""

    criterion: object
    attention_kernel: str
    fused_optimizer: bool
    channels_last: bool


# --- command line


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", help=f"{', '.join(NAMED_SHAPES)} or HxW")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS)
    parser.add_argument("--batch-sizes", nargs="+", type=int)
    parser.add_argument("--paths", nargs="+", choices=PATHS)
    parser.add_argument("--full", action="store_true", help="every shape x precision x batch size x path")
    parser.add_argument("--steps", type=int, help="timed steps per cell (default 10; tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 3; tiny: 1)")
    parser.add_argument("--profile-steps", type=int, default=2, help="profiled steps for syncs and attention share")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; start no new cell after this (the ones left are listed as skipped)")
    parser.add_argument("--json", type=Path, help="write every cell and the comparisons here (after each cell)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model-size", choices=sorted(MODEL_CONFIGS), default="r50",
                        help="tiny: the small model on 96x96 images, batch 2, fp32, to check the script on CPU")
    parser.add_argument("--peak-tflops", nargs="+", type=float, metavar="TFLOPS",
                        help="dense peak of this GPU: BF16 [TF32 [FP32]], for a GPU not in the table")
    args = parser.parse_args()
    tiny = args.model_size == "tiny"
    args.steps = args.steps or (2 if tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 3)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; check the script on CPU with --device cpu --model-size tiny")
    if args.device.type != "cuda" and set(args.precisions or ["fp32"]) != {"fp32"}:
        parser.error("only --precisions fp32 runs without CUDA")
    return args


def cells_to_run(args: argparse.Namespace) -> list[Cell]:
    """The default cells, or the product of the lists given (a list not given takes all its values)."""
    if args.model_size == "tiny" or args.device.type != "cuda":
        return [Cell(shape, precision, batch, path)
                for shape in args.shapes or [TINY_SHAPE] for precision in args.precisions or ["fp32"]
                for batch in args.batch_sizes or [2] for path in args.paths or PATHS]
    if not (args.full or args.shapes or args.precisions or args.batch_sizes or args.paths):
        return [Cell(*cell) for cell in DEFAULT_CELLS]
    return [Cell(shape, precision, batch, path)
            for shape in args.shapes or NAMED_SHAPES for batch in args.batch_sizes or BATCH_SIZES
            for precision in args.precisions or PRECISIONS for path in args.paths or PATHS]


# --- environment and shapes


def compose_config(model_size: str, overrides: list[str]):
    return compose("config", overrides=[f"model={MODEL_CONFIGS[model_size]}", *overrides])


def resolve_shape(name: str) -> tuple[int, int]:
    """(height, width) of a named shape, as the project's processor makes it, or of `HxW`."""
    if name in NAMED_SHAPES:
        data_config, (height, width) = NAMED_SHAPES[name]
        data = compose("config", overrides=[f"data={data_config}"]).data
        processor = build_image_processor(data.image_size, data.max_size_ratio)
        encoded = processor(images=[np.zeros((height, width, 3), dtype=np.uint8)], return_tensors="pt")
        return tuple(encoded["pixel_values"].shape[-2:])
    try:
        height, width = (int(side) for side in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"unknown shape {name!r}: use {', '.join(NAMED_SHAPES)} or HxW") from None
    return height, width


def shape_label(name: str, hw: tuple[int, int]) -> str:
    size = f"{hw[0]}x{hw[1]}"
    return size if name == size else f"{name} {size}"


# --- inputs and models


def random_targets(generator: torch.Generator) -> dict:
    count = int(torch.randint(6, 11, (1,), generator=generator))
    # Sides log-uniform from 2% to 50% of the image: small objects as in BDD100K next to large ones.
    sides = torch.empty(count, 2).uniform_(math.log(0.02), math.log(0.5), generator=generator).exp()
    centres = sides / 2 + torch.rand(count, 2, generator=generator) * (1 - sides)
    return {"class_labels": torch.randint(0, len(CLASS_NAMES), (count,), generator=generator),
            "boxes": torch.cat([centres, sides], dim=1)}


@functools.lru_cache(maxsize=2)
def synthetic_batch(batch_size: int, height: int, width: int, pin: bool) -> dict:
    """A batch as the loader gives it, on the CPU; pinned on CUDA so TrainStep's copies are async."""
    generator = torch.Generator().manual_seed(SEED)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, height, width, generator=generator),
        "pixel_mask": torch.ones(batch_size, height, width, dtype=torch.long),
        "labels": [random_targets(generator) for _ in range(batch_size)],
    }
    if not pin:
        return batch
    return {"pixel_values": batch["pixel_values"].pin_memory(), "pixel_mask": batch["pixel_mask"].pin_memory(),
            "labels": [{key: value.pin_memory() for key, value in label.items()} for label in batch["labels"]]}


def build_template(model_size: str) -> torch.nn.Module:
    """The random-init model every cell starts from (a deep copy each), kept on the CPU."""
    torch.manual_seed(SEED)
    return build_model(compose_config(model_size, []).model, CLASS_NAMES)


def run_attention_in_fp32(model: torch.nn.Module, device_type: str) -> int:
    """The old code's fp32 island: each deformable attention module (projections and sampling)
    runs with autocast off on float32 inputs. Returns how many modules were wrapped."""
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    modules = [m for m in model.modules() if isinstance(m, DeformableDetrMultiscaleDeformableAttention)]
    for module in modules:
        module.forward = _in_fp32(module.forward, device_type)
    return len(modules)


def _in_fp32(forward, device_type: str):
    def as_fp32(value):
        return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    @functools.wraps(forward)
    def fp32_forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, enabled=False):
            return forward(*map(as_fp32, args), **{key: as_fp32(value) for key, value in kwargs.items()})

    return fp32_forward


def prepare_model(template: torch.nn.Module, cfg, path: str, device: torch.device) -> tuple[torch.nn.Module, Setup]:
    model = copy.deepcopy(template).to(device)
    if path == "fast":
        paths = apply_fast_paths(model, cfg.model, cfg.training, device)
        return model, Setup(paths.criterion, paths.attention_kernel, paths.fused_optimizer, paths.channels_last)
    # The old code: none of apply_fast_paths, so transformers' loss and encoder layers stay.
    kernel = install_attention_kernel(model, cfg.model.attention_kernel, device)
    if device.type == "cuda":
        set_tf32(cfg.training.tf32)
    if cfg.training.amp:
        run_attention_in_fp32(model, device.type)
    return model, Setup(None, kernel, False, False)


def build_train_step(model: torch.nn.Module, setup: Setup, cfg, device: torch.device) -> TrainStep:
    train_cfg = cfg.training
    optimizer = build_optimizer(model, train_cfg, fused=setup.fused_optimizer)
    schedule = LRSchedule(optimizer, train_cfg.schedule, total_steps=10_000, steps_per_epoch=1_000)
    return TrainStep(
        model, optimizer, schedule, resolve_precision(train_cfg.amp, train_cfg.amp_dtype, device),
        grad_clip=train_cfg.grad_clip,
        # A random-init model may well produce a non-finite loss: count it, never stop the benchmark.
        nonfinite=NonFiniteGuard(max_in_a_row=10**9),
        device=device, criterion=setup.criterion, channels_last=setup.channels_last,
    )


# --- measurements


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: TrainStep, batch: dict, state: TrainState, count: int, device: torch.device) -> list[float]:
    """Seconds per step. Synchronising at both ends counts all of a step's GPU work in it."""
    times = []
    for _ in range(count):
        synchronize(device)
        start = time.perf_counter()
        step([batch], state)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def profiled_trace(step: TrainStep, batch: dict, state: TrainState, count: int, device: torch.device) -> list[dict]:
    """The chrome-trace events of `count` steps, each inside a `STEP_MARK` range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(count):
            with record_function(STEP_MARK):
                step([batch], state)
        synchronize(device)  # outside every step range: not counted
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return [event for event in json.loads(trace.read_text())["traceEvents"] if event.get("ph") == "X"]


def host_syncs(events: list[dict]) -> int:
    """Synchronising CUDA API calls made inside the step ranges (see the module docstring)."""
    steps = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("cat") == "user_annotation"
             and e.get("name") == STEP_MARK]
    pageable_d2h = {e.get("args", {}).get("correlation") for e in events if e.get("cat") == "gpu_memcpy"
                    and "DtoH" in e.get("name", "") and "Pageable" in e.get("name", "")}
    calls_by_thread: dict = {}
    for e in sorted(events, key=lambda e: e["ts"]):
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(s <= e["ts"] <= end for s, end in steps):
            calls_by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    syncs = 0
    for calls in calls_by_thread.values():
        for index, call in enumerate(calls):
            if call["name"] in SYNC_CALLS:
                syncs += 1
            elif call["name"].startswith("cudaMemcpyAsync") and call.get("args", {}).get("correlation") in pageable_d2h:
                following = calls[index + 1]["name"] if index + 1 < len(calls) else ""
                syncs += following not in SYNC_CALLS  # else the synchronize that follows is the one counted
    return syncs


def attention_share(events: list[dict]) -> float | None:
    """Deformable-attention sampling kernels' share of all GPU kernel time in the trace."""
    kernels = [e for e in events if e.get("cat", "").lower() == "kernel"]
    total = sum(e.get("dur", 0) for e in kernels)
    if not total:
        return None
    attention = sum(e.get("dur", 0) for e in kernels if e["name"] in ATTENTION_KERNELS or "grid_sampler" in e["name"])
    return attention / total


def training_flops_per_image(template: torch.nn.Module, model_size: str, hw: tuple[int, int],
                             device: torch.device) -> float:
    """FLOPs of forward + backward of one image, fp32, PyTorch attention (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = compose_config(model_size, ["model.attention_kernel=pytorch", *precision_overrides("fp32")])
    model, _ = prepare_model(template, cfg, "fast", device)
    model.train()
    pixel_values, pixel_mask, labels = to_device(synthetic_batch(1, *hw, pin=False), device)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss.backward()
    return float(counter.get_total_flops())


def peak_tflops_table(env: dict, override: list[float] | None) -> tuple | None:
    """(bf16/fp16, TF32, fp32) dense peaks of this device; None entries are unknown."""
    if override:
        return tuple(override[index] if index < len(override) else None for index in range(3))
    # Whole words: "A100" matches "NVIDIA A100-SXM4-80GB", "L4" does not match "L40S".
    return next((peaks for name, peaks in PEAK_TFLOPS if re.search(rf"\b{name}\b", env["device"])), None)


def precision_overrides(precision: str) -> list[str]:
    amp, amp_dtype, tf32 = PRECISION_SETTINGS[precision]
    return [f"training.amp={str(amp).lower()}", f"training.amp_dtype={amp_dtype}", f"training.tf32={str(tf32).lower()}"]


# --- one cell


@dataclass
class Bench:
    args: argparse.Namespace
    template: torch.nn.Module
    shapes: dict  # name -> (height, width)
    flops_per_image: dict  # name -> float | None
    peaks: tuple | None


def measure_cell(cell: Cell, bench: Bench) -> dict:
    args, device = bench.args, bench.args.device
    cuda = device.type == "cuda"
    cfg = compose_config(args.model_size, [*PATH_OVERRIDES[cell.path], *precision_overrides(cell.precision)])
    torch.manual_seed(SEED)
    model, setup = prepare_model(bench.template, cfg, cell.path, device)
    step = build_train_step(model, setup, cfg, device)
    batch = synthetic_batch(cell.batch_size, *bench.shapes[cell.shape], pin=cuda)
    state = TrainState()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step([batch], state)
    times = timed_steps(step, batch, state, args.steps, device)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    events = profiled_trace(step, batch, state, args.profile_steps, device)
    step_s = statistics.median(times)
    flops = bench.flops_per_image.get(cell.shape)
    flops_per_step = flops * cell.batch_size if flops else None
    peak = bench.peaks[PEAK_INDEX[cell.precision]] if bench.peaks else None
    return {
        "attention_kernel": setup.attention_kernel,
        "images_per_s": cell.batch_size / step_s,
        "step_ms": step_s * 1000,
        "step_ms_all": [t * 1000 for t in times],
        "peak_memory_gib": peak_gib,
        "host_syncs_per_step": host_syncs(events) / args.profile_steps if cuda else None,
        "attention_share": attention_share(events) if cuda else None,
        "gflop_per_step": flops_per_step / 1e9 if flops_per_step else None,
        "mfu": flops_per_step / step_s / (peak * 1e12) if flops_per_step and peak and cuda else None,
        "skipped_steps": state.meter.skipped,
        "last_loss": state.meter.means().get("loss"),
    }


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_cell(cell: Cell, bench: Bench) -> dict:
    result = {**asdict(cell), "hw": list(bench.shapes[cell.shape]), "status": "ok"}
    try:
        result.update(measure_cell(cell, bench))
    except Exception as exc:  # noqa: BLE001 - one failing cell must not end a GPU session's only run
        if is_out_of_memory(exc):
            result["status"] = "OOM"
        else:
            traceback.print_exc()
            result["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    # Out here the exception, its traceback and the frames holding the cell's tensors are gone.
    gc.collect()
    if bench.args.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# --- report


COLUMNS = (("shape", 17), ("path", 8), ("prec", 4), ("batch", 5), ("kernel", 7), ("img/s", 7), ("step ms", 8),
           ("peak GiB", 8), ("syncs/step", 10), ("attn %", 6), ("GFLOP/step", 10), ("MFU %", 6))


def _number(value, digits: int = 1, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}"


def _columns(texts: list[str]) -> str:
    """Texts laid out under COLUMNS: the four that name the cell to the left, numbers to the right."""
    return "  ".join(text.rjust(width) if index >= 3 else text.ljust(width)
                     for index, (text, (_, width)) in enumerate(zip(texts, COLUMNS)))


def table_header() -> str:
    return _columns([name for name, _ in COLUMNS])


def table_row(result: dict, bench: Bench) -> str:
    label = shape_label(result["shape"], bench.shapes[result["shape"]])
    names = [label, result["path"], result["precision"], str(result["batch_size"])]
    if result["status"] != "ok":
        return f"{_columns(names)}  {result['status']}"
    row = _columns(names + [
        result["attention_kernel"], _number(result["images_per_s"]), _number(result["step_ms"]),
        _number(result["peak_memory_gib"], 2), _number(result["host_syncs_per_step"]),
        _number(result["attention_share"], 1, 100), _number(result["gflop_per_step"], 1),
        _number(result["mfu"], 1, 100),
    ])
    if result["skipped_steps"]:
        row += f"  ({result['skipped_steps']} non-finite steps skipped)"
    return row


def comparisons(results: list[dict]) -> list[dict]:
    """bf16 against fp32 without TF32 (speed, memory), and fast against baseline (speed)."""
    ok = {(r["shape"], r["precision"], r["batch_size"], r["path"]): r for r in results if r["status"] == "ok"}
    rows = []
    for (shape, precision, batch, path), result in ok.items():
        fp32 = ok.get((shape, "fp32", batch, path))
        if precision == "bf16" and fp32:
            memory = (result["peak_memory_gib"] / fp32["peak_memory_gib"]) if fp32["peak_memory_gib"] else None
            rows.append({"shape": shape, "batch_size": batch, "path": path, "compare": "bf16 / fp32",
                         "speed": result["images_per_s"] / fp32["images_per_s"], "memory": memory})
        baseline = ok.get((shape, precision, batch, "baseline"))
        if path == "fast" and baseline:
            rows.append({"shape": shape, "batch_size": batch, "path": None, "compare": f"fast / baseline {precision}",
                         "speed": result["images_per_s"] / baseline["images_per_s"], "memory":
                         result["peak_memory_gib"] / baseline["peak_memory_gib"]
                         if baseline["peak_memory_gib"] else None})
    return rows


def target_checks(results: list[dict], ratios: list[dict]) -> list[str]:
    """The issue's targets, for every cell that measures one (fast path)."""
    lines = []
    for r in results:
        if r["status"] != "ok" or r["path"] != "fast":
            continue
        target = TARGET_IMAGES_PER_S.get(r["batch_size"])
        if r["precision"] == "bf16" and target:
            lines.append(_check(f"{r['shape']} bf16 batch {r['batch_size']}: {r['images_per_s']:.1f} img/s",
                                r["images_per_s"] >= target, f">= {target:.0f}"))
        if r["host_syncs_per_step"] is not None:
            lines.append(_check(f"{r['shape']} {r['precision']} batch {r['batch_size']}: "
                                f"{r['host_syncs_per_step']:.1f} host syncs/step",
                                r["host_syncs_per_step"] <= TARGET_SYNCS_PER_STEP, f"<= {TARGET_SYNCS_PER_STEP}"))
    for ratio in ratios:
        if ratio["compare"] == "bf16 / fp32" and ratio["path"] == "fast":
            where = f"{ratio['shape']} batch {ratio['batch_size']}"
            lines.append(_check(f"{where}: bf16 / fp32 speed {ratio['speed']:.2f}x",
                                ratio["speed"] >= TARGET_BF16_SPEEDUP, f">= {TARGET_BF16_SPEEDUP}x"))
            if ratio["memory"] is not None:
                lines.append(_check(f"{where}: bf16 / fp32 peak memory {ratio['memory']:.2f}x",
                                    ratio["memory"] <= TARGET_BF16_MEMORY, f"<= {TARGET_BF16_MEMORY}x"))
    return lines


def _check(what: str, met: bool, target: str) -> str:
    return f"{what} (target {target}): {'met' if met else 'MISSED'}"


def print_summary(results: list[dict], ratios: list[dict]) -> None:
    if ratios:
        print("\nratios (speed = images/s; memory = peak GiB; fp32 = TF32 off)")
        for ratio in ratios:
            path = f" {ratio['path']}" if ratio["path"] else ""
            memory = f", memory {ratio['memory']:.2f}x" if ratio["memory"] is not None else ""
            print(f"  {ratio['shape']} batch {ratio['batch_size']}{path}: {ratio['compare']} speed "
                  f"{ratio['speed']:.2f}x{memory}")
    checks = target_checks(results, ratios)
    if checks:
        print("\ntargets")
        for line in checks:
            print(f"  {line}")


def write_json(path: Path | None, env: dict, args: argparse.Namespace, bench: Bench, results: list[dict],
               ratios: list[dict]) -> None:
    if path is None:
        return
    settings = {key: str(value) if isinstance(value, (Path, torch.device)) else value
                for key, value in vars(args).items()}
    payload = {"environment": env, "settings": settings,
               "shapes": {name: list(hw) for name, hw in bench.shapes.items()},
               "flops_per_image": bench.flops_per_image, "peak_tflops": bench.peaks,
               "cells": results, "comparisons": ratios}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    device = args.device
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | transformers {env['transformers']} | triton {env['triton']} "
          f"| CUDA {env['cuda']}", flush=True)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cells = cells_to_run(args)
        shapes = {name: resolve_shape(name) for name in dict.fromkeys(cell.shape for cell in cells)}
        template = build_template(args.model_size)
        bench = Bench(args, template, shapes, {}, peak_tflops_table(env, args.peak_tflops))
        for name, hw in shapes.items():
            try:
                bench.flops_per_image[name] = training_flops_per_image(template, args.model_size, hw, device)
            except Exception:  # noqa: BLE001 - without a count only the MFU column is lost
                traceback.print_exc()
                bench.flops_per_image[name] = None
            gc.collect()
        print(f"model {MODEL_CONFIGS[args.model_size]}, {args.warmup} warm-up + {args.steps} timed + "
              f"{args.profile_steps} profiled steps per cell; shapes "
              + ", ".join(shape_label(name, hw) for name, hw in shapes.items()), flush=True)
        print(table_header(), flush=True)
        results: list[dict] = []
        for index, cell in enumerate(cells):
            if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                left = ", ".join(f"{c.shape}/{c.precision}/{c.batch_size}/{c.path}" for c in cells[index:])
                print(f"time budget of {args.time_budget:.0f}s spent; skipped: {left}", flush=True)
                break
            results.append(run_cell(cell, bench))
            print(table_row(results[-1], bench), flush=True)
            write_json(args.json, env, args, bench, results, comparisons(results))
    ratios = comparisons(results)
    print_summary(results, ratios)
    write_json(args.json, env, args, bench, results, ratios)
    print(f"\n{len(results)} cells in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
